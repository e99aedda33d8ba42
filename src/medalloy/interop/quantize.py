"""int8 quantization of an exported graph through ONNX Runtime's quantization tools.

Two modes, as ONNX Runtime offers them:
- ``static`` (QDQ format, MinMax calibration): weights *and* activations in int8, activation ranges
  measured on calibration patches the caller prepares exactly as prediction will (the plan's
  preprocessing and patch). ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into
  integer convolutions; operators it has no int8 kernel for (InstanceNormalization) stay float.
- ``dynamic``: weights in int8, activation ranges computed per call; needs no data.

Calibration batches are ``(1, C, *patch)`` float32 arrays; a few dozen cover the ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from medalloy.errors import MedalloyError
from medalloy.interop.onnx_runtime import INPUT

QuantMode = Literal["static", "dynamic"]


class _Batches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a list of arrays."""

    def __init__(self, arrays: Iterable[np.ndarray]):
        self._it = iter([{INPUT: np.ascontiguousarray(a, np.float32)} for a in arrays])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(src: str | Path, dst: str | Path, mode: QuantMode, calibration: list[np.ndarray] | None = None) -> None:
    """Write the int8 form of the fp32 graph ``src`` to ``dst``."""
    try:
        from onnxruntime import quantization as q
    except ImportError:
        raise MedalloyError("int8 quantization needs onnxruntime", src, "pip install onnxruntime (part of the base install)") from None
    src, dst = Path(src), Path(dst)
    # the quantizer's own notes (skipped nodes, pre-processing advice) are not the user's concern
    logging.getLogger("root").setLevel(logging.ERROR)
    if mode == "dynamic":
        q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8)
        return
    if not calibration:
        raise MedalloyError("static int8 quantization needs calibration images", src, "pass --calibration DIR (images as for predict --input)")
    q.quantize_static(
        str(src), str(dst), _Batches(calibration), quant_format=q.QuantFormat.QDQ, activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8, per_channel=True, calibrate_method=q.CalibrationMethod.MinMax,
    )  # fmt: skip
