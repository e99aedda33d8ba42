"""Parameter count and versions of an nnU-Net checkpoint, run by the nnU-Net venv's python:

    python facts.py checkpoint_final.pth      -> {"params": ..., "nnunetv2": ..., "torch": ...}

It reads the checkpoint without unpickling arbitrary objects (weights_only=True), allowing only the
numpy scalar and dtype types nnU-Net stores in its logs. The work is under ``__main__``: nnU-Net
imports every module of this folder (its ``nnUNet_extTrainer``) when it looks for the trainer class.
"""

import json
import sys


def main(checkpoint: str) -> dict:
    from importlib.metadata import version

    import numpy as np
    import torch

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed = [scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    with torch.serialization.safe_globals(allowed):
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # the state dict names some tensors twice: count each tensor in memory once
    ws = {(v.data_ptr(), tuple(v.shape)): v.numel() for v in ck["network_weights"].values() if v.is_floating_point()}
    try:
        nnunet = version("nnunetv2")
    except Exception:
        nnunet = None
    return {"params": sum(ws.values()), "nnunetv2": nnunet, "torch": torch.__version__}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
