"""The torch-free deployment runtime: its resampling and sliding window equal the PyTorch path's
(MONAI's window, torch's interpolation), and an exported graph predicts the same label maps in a
process where torch and MONAI cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from medalloy.data.io import read_label
from medalloy.data.preprocess import _resize
from medalloy.data.synth import generate_dataset
from medalloy.runtime.resample import resize_linear, resize_nearest
from medalloy.runtime.sliding_window import gaussian_weights, sliding_window, window_starts

RESIZES = [
    ((2, 3, 96, 80), (40, 36)),  # 2D shrink: antialiased
    ((1, 1, 50, 70), (120, 140)),  # 2D growth
    ((1, 2, 100, 30), (40, 45)),  # one axis shrinks, one grows: antialiased both (as torch is asked)
    ((1, 2, 20, 30, 40), (25, 15, 40)),  # 3D: linear, never antialiased
    ((1, 1, 7, 300), (9, 100)),
]


@pytest.mark.parametrize("shape, size", RESIZES)
def test_resampling_is_the_pytorch_paths(shape, size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours, theirs = resize_linear(x, size), _resize(torch.from_numpy(x), size, "linear").numpy()
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-4
    labels = np.random.default_rng(1).integers(0, 4, shape).astype(np.float32)
    assert np.array_equal(resize_nearest(labels, size), _resize(torch.from_numpy(labels), size, "nearest").numpy())


def test_the_sliding_window_is_monais():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((2, 3)).astype(np.float32)

    def net(b: np.ndarray) -> np.ndarray:  # position-dependent, so a misplaced window shows
        return (np.einsum("bc...,ck->bk...", b, mix) + np.sin(np.arange(b.shape[-1], dtype=np.float32))).astype(np.float32)

    for shape, patch in [((2, 2, 100, 90), (64, 64)), ((1, 2, 40, 50), (64, 32)), ((1, 2, 33, 47, 20), (16, 32, 16)), ((3, 2, 64, 64), (64, 64))]:
        x = rng.standard_normal(shape).astype(np.float32)
        theirs = sliding_window_inference(
            torch.from_numpy(x), roi_size=patch, sw_batch_size=4, predictor=lambda t: torch.from_numpy(net(t.numpy())), overlap=0.5, mode="gaussian"
        ).numpy()
        ours = sliding_window(x, patch, net, 0.5, 4)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-5, (shape, patch)
    assert np.allclose(gaussian_weights((16, 24)), compute_importance_map((16, 24), mode="gaussian").numpy(), atol=1e-6)
    assert window_starts(100, 64, 0.5) == [0, 32, 36] and window_starts(64, 64, 0.5) == [0] and window_starts(65, 64, 0.5) == [0, 1]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Tiny experts exported to ONNX: a 2D plan on 2D images, a 3D plan on volumes, a 2D plan slicing volumes."""
    from medalloy.data.dataset import RawDataset
    from medalloy.export import export_onnx
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset
    from medalloy.recipes.expert import ExpertConfig, train_expert

    root = tmp_path_factory.mktemp("runtime")
    cxr = generate_dataset("Dataset902_SynthCXR", root, seed=3, cases_per_source=2, test_cases_per_source=1, progress=False)
    mr = generate_dataset("Dataset901_SynthMR", root, seed=3, cases_per_source=2, test_cases_per_source=1, progress=False)
    out = {}
    for name, data, kw in (
        ("2d", cxr, {"max_2d_side": 64}),
        ("3d", mr, {"force_dim": 3, "max_3d_voxels": 16**3}),
        ("sliced", mr, {"force_dim": 2, "max_2d_side": 32}),
    ):
        ds = RawDataset(data)
        plan = plan_dataset(ds, fingerprint(ds, progress=False), base_filters=4, **kw)
        cfg = ExpertConfig(folds=2, max_val_cases=1)
        cfg.train.steps, cfg.train.val_every, cfg.train.precision = 2, 2, "fp32"
        train_expert(data, root / name, plan=plan, config=cfg, progress=False)
        export_onnx(root / name, root / f"{name}.onnx")
        out[name] = (root / f"{name}.onnx", data / "imagesTs", root / name)
    return out


# every module the base install (pyproject's dependencies) leaves to the extras
TRAIN_EXTRA = ("torch", "torchvision", "monai", "scipy", "safetensors", "matplotlib", "einops", "markdown", "tokenizers", "sacrebleu", "rouge_score",
               "onnx", "onnxscript", "dynamic_network_architectures", "transformers")  # fmt: skip

NO_TORCH = f"""
import sys, importlib.abc
TRAIN_EXTRA = {TRAIN_EXTRA!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in TRAIN_EXTRA:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)  # as in an install without them
sys.meta_path.insert(0, Block())
from medalloy.cli import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in TRAIN_EXTRA for m in sys.modules), "the training stack was imported"
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["2d", "3d", "sliced"])
def test_an_exported_graph_predicts_without_torch_as_the_pytorch_path_does(graphs, kind, tmp_path):
    from medalloy.predict import predict_folder

    onnx_file, images, run = graphs[kind]
    predict_folder(run, images, tmp_path / "torch", precision="fp32", device="cpu", progress=False)
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_TORCH), "-q", "predict", str(onnx_file), "--input", str(images), "--output", str(tmp_path / "runtime")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(ONNX Runtime)" in res.stdout
    written = sorted((tmp_path / "torch").iterdir())
    assert written and [p.name for p in written] == sorted(p.name for p in (tmp_path / "runtime").iterdir())
    for path in written:
        ours, theirs = read_label(tmp_path / "runtime" / path.name)[0], read_label(path)[0]
        assert ours.shape == theirs.shape and (ours == theirs).mean() > 0.999, path.name
    # the probabilities themselves, not only their argmax (a barely trained network may label little)
    from medalloy.data.input_folder import find_input_cases
    from medalloy.data.io import read_image
    from medalloy.engine.inference import Predictor
    from medalloy.interop.onnx_runtime import load_onnx
    from medalloy.runtime import OnnxPredictor

    module, plan, meta = load_onnx(onnx_file)
    reference, runtime = Predictor(module, plan, precision="fp32", activation=meta["activation"]), OnnxPredictor(onnx_file)
    for files in find_input_cases(images).values():
        image, image_meta = read_image(files)
        theirs = reference.predict_probabilities(image, image_meta).numpy()
        ours = runtime.predict_probabilities(image, image_meta)
        assert ours.shape == theirs.shape == (plan.num_classes, *image_meta.shape) and np.abs(ours - theirs).max() < 1e-4
        assert theirs.std() > 1e-3  # not a constant map that any layout would match
    # without torch, what needs it says so in one line instead of a traceback
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_TORCH), "-q", "predict", str(run), "--input", str(images), "--output", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(err) == 1 and "medalloy[train]" in err[0], res.stderr[-2000:]
