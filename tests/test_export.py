"""ONNX export and ONNX Runtime prediction: the graph's logits equal PyTorch's (max abs difference
< 1e-3, fp32) for an expert and a universal model bound to a task list (a student: test_distill.py); a graph without
its sidecar, or with another model's, is a one-line error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import medalloy

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from medalloy.cli import main  # noqa: E402
from medalloy.data.io import read_label  # noqa: E402
from medalloy.data.synth import generate_dataset  # noqa: E402
from medalloy.errors import MedalloyError  # noqa: E402
from medalloy.export import calibration_patches, export_onnx  # noqa: E402
from medalloy.interop.onnx_runtime import load_onnx, sidecar_path  # noqa: E402
from medalloy.planning.fingerprint import fingerprint  # noqa: E402
from medalloy.planning.planner import plan_dataset  # noqa: E402
from medalloy.predict import load_model, predict_folder  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return [
        generate_dataset(n, root, seed=2, cases_per_source=2, test_cases_per_source=1, progress=False) for n in ("Dataset902_SynthCXR", "Dataset904_SynthEndo")
    ]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    from medalloy.data.dataset import RawDataset
    from medalloy.recipes.expert import ExpertConfig, train_expert
    from medalloy.recipes.universal import UniversalConfig, train_universal

    root = tmp_path_factory.mktemp("runs")
    ds = RawDataset(data[0])
    plan = plan_dataset(ds, fingerprint(ds, progress=False), max_2d_side=64, base_filters=4)
    expert = ExpertConfig(folds=2, max_val_cases=1)
    expert.train.steps, expert.train.val_every, expert.train.precision = 3, 3, "fp32"  # the int8 floor below: not the CPU's bf16 units
    train_expert(data[0], root / "expert", plan=plan, config=expert, progress=False)
    cfg = UniversalConfig(base_filters=4, max_2d_side=64, max_val_cases=1, folds=2)
    cfg.train.steps, cfg.train.val_every, cfg.train.precision = 3, 3, "fp32"
    train_universal(data, root / "universal", config=cfg, progress=False)
    return root


def _max_diff(torch_model, onnx_file, shape):
    onnx_model, _, _ = load_onnx(onnx_file)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))  # batch 2: the batch axis is dynamic
    with torch.no_grad():
        return float((torch_model.eval().float()(x) - onnx_model(x)).abs().max())


def test_expert_graph_matches_pytorch_and_predicts_through_onnx_runtime(data, runs, tmp_path):
    out = tmp_path / "expert.onnx"
    assert main(["-q", "export", str(runs / "expert"), "--out", str(out)]) == 0
    meta = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    assert meta["opset"] >= 17 and meta["activation"] == "softmax" and meta["labels"] == {"background": 0, "lung": 1, "heart": 2}
    assert meta["medalloy"] == medalloy.__version__  # the release, from its one place
    model, plan, _ = load_model(runs / "expert" / "checkpoints" / "best.safetensors")
    assert _max_diff(model, out, (plan.in_channels, *plan.patch_size)) < 1e-3
    # dynamic spatial size: any multiple of the total stride, e.g. one more stride along the first axis
    m = meta["spatial"]["multiple_of"]
    total = [int(np.prod([s[i] for s in plan.network.strides])) for i in range(2)]
    assert meta["spatial"]["dynamic"] and m == total and min(total) > 1 and meta["input"]["shape"] == ["batch", 1, "height", "width"]
    assert _max_diff(model, out, (plan.in_channels, plan.patch_size[0] + m[0], plan.patch_size[1])) < 1e-3
    # the same label maps as the PyTorch path (fp32 both), through the same pre/post-processing
    a, b = tmp_path / "pt", tmp_path / "ort"
    predict_folder(runs / "expert", data[0] / "imagesTs", a, precision="fp32", device="cpu", progress=False)
    assert main(["-q", "predict", str(out), "--input", str(data[0] / "imagesTs"), "--output", str(b), "--precision", "fp32"]) == 0
    for f in sorted(a.glob("*.png")):
        agree = (read_label(f)[0] == read_label(b / f.name)[0]).mean()
        assert agree > 0.999, f.name


def test_universal_bound_to_tasks_matches_pytorch(runs, tmp_path):
    from medalloy.recipes.registry import load_checkpoint_tasks

    out = tmp_path / "uni.onnx"
    meta = export_onnx(runs / "universal", out, tasks=["lesion", "lung"])
    assert meta["tasks"] == ["lesion", "lung"] and meta["activation"] == "sigmoid"
    model, plan, _, _ = load_checkpoint_tasks(runs / "universal" / "checkpoints" / "best.safetensors", ["lesion", "lung"])
    assert _max_diff(model, out, (plan.in_channels, *plan.patch_size)) < 1e-3
    if meta["spatial"]["dynamic"]:  # what the sidecar promises holds
        assert _max_diff(model, out, (plan.in_channels, plan.patch_size[0] + meta["spatial"]["multiple_of"][0], plan.patch_size[1])) < 1e-3
    else:
        assert meta["input"]["shape"][2:] == plan.patch_size
    # a student run: tests/recipes/test_distill.py::test_student_run_exports_to_onnx_with_matching_logits


def test_graph_without_or_with_a_foreign_sidecar_is_one_line(runs, tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(runs / "expert", a)
    export_onnx(runs / "universal", b, dataset="SynthEndo")
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(a, lonely)
    with pytest.raises(MedalloyError, match="no sidecar lonely.onnx.json"):
        load_onnx(lonely)
    # the command line says it in one line: the graph, the sidecar it misses, and how to get both
    assert main(["-q", "predict", str(lonely), "--input", str(tmp_path), "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medalloy: error: {lonely}:"), err
    assert "no sidecar lonely.onnx.json" in err[0] and "export with medalloy export, which writes both" in err[0]
    assert not (tmp_path / "p").exists()  # refused before writing anything
    shutil.copy(sidecar_path(b), sidecar_path(lonely))  # another model's sidecar
    assert main(["-q", "predict", str(lonely), "--input", str(tmp_path), "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "describes another model" in err[0] and "lonely.onnx.json" in err[0]
    assert main(["-q", "export", str(runs / "expert"), "--out", str(a)]) == 1  # an existing file is kept
    assert "--overwrite" in capsys.readouterr().err


def test_int8_export_quantizes_weights_and_activations_and_stays_close(data, runs, tmp_path, capsys):
    import numpy as np
    import onnx

    model, plan, _ = load_model(runs / "expert" / "checkpoints" / "best.safetensors")
    fp32, static, dynamic = tmp_path / "fp32.onnx", tmp_path / "static.onnx", tmp_path / "dynamic.onnx"
    export_onnx(runs / "expert", fp32)
    assert main(["-q", "export", str(runs / "expert"), "--out", str(static), "--quantize", "int8", "--calibration", str(data[0] / "imagesTr")]) == 0
    assert "int8 (static, 32 calibration patches)" in capsys.readouterr().out
    meta = json.loads(sidecar_path(static).read_text(encoding="utf-8"))
    assert meta["quantization"] == {"type": "int8", "mode": "static", "calibration": str(data[0] / "imagesTr"), "samples": 32}
    assert export_onnx(runs / "expert", dynamic, quantize="int8")["quantization"]["mode"] == "dynamic"
    for f in (static, dynamic):
        graph = onnx.load(str(f))
        int8 = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert int8, f"{f.name} holds no int8 weights"
    ops = {n.op_type for n in onnx.load(str(static)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations too, not only weights
    # the int8 graph answers like the fp32 one on held-out images (a network trained 3 steps: logits
    # of small margins, so correlation rather than label agreement)
    x = torch.from_numpy(np.concatenate(calibration_patches(plan, data[0] / "imagesTs", 2, seed=1)))
    ref = load_onnx(fp32)[0](x).flatten()
    for f in (static, dynamic):
        got = load_onnx(f)[0](x).flatten()
        corr = float(torch.corrcoef(torch.stack([got, ref]))[0, 1])
        assert corr > 0.9, f"{f.name}: {corr}"  # measured 0.958 static, 0.988 dynamic; a broken scale gives ~0


def test_failed_dynamic_export_falls_back_to_the_patch_and_says_why(runs, tmp_path, monkeypatch, caplog):
    """A network whose graph fixes its sizes still exports (at the plan's patch), but the warning and
    the sidecar name the exporter's error; an error that is not the exporter's is not swallowed."""
    import logging

    model, plan, _ = load_model(runs / "expert" / "checkpoints" / "best.safetensors")
    real = torch.onnx.export
    summary = "<class 'torch.fx.experimental.symbolic_shapes.ConstraintViolationError'>: 96 not in range [4, 8]"

    def fixed_sizes(*args, dynamic_shapes, **kwargs):
        if len(dynamic_shapes[0]) > 1:  # spatial axes asked for: fail as torch.export does on such a graph
            raise torch.onnx.errors.OnnxExporterError(
                f"Failed to export the model with \x1b[96mtorch.export\x1b[0m.\n\n## Exception summary\n\n{summary}\n\nmore advice"
            )
        return real(*args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fixed_sizes)
    out = tmp_path / "static.onnx"
    with caplog.at_level(logging.WARNING, logger="medalloy.export"):
        meta = export_onnx(runs / "expert", out)
    reason = f"OnnxExporterError: {summary}"
    assert meta["spatial"] == {"dynamic": False, "multiple_of": plan.network.total_stride(), "static_reason": reason}
    assert json.loads(sidecar_path(out).read_text(encoding="utf-8"))["spatial"]["static_reason"] == reason
    assert meta["input"]["shape"] == ["batch", plan.in_channels, *plan.patch_size]
    warned = [r.getMessage() for r in caplog.records if r.name == "medalloy.export" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and reason in warned[0] and "\n" not in warned[0], warned
    assert _max_diff(model, out, (plan.in_channels, *plan.patch_size)) < 1e-3  # the fallback graph is the same network

    def broken(*args, dynamic_shapes, **kwargs):
        if len(dynamic_shapes[0]) > 1:  # only the dynamic attempt: the static one would succeed, hiding the bug
            raise ValueError("a bug, not a graph with fixed sizes")
        return real(*args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ValueError, match="a bug"):
        export_onnx(runs / "expert", tmp_path / "bug.onnx")
    assert not (tmp_path / "bug.onnx").exists() and not sidecar_path(tmp_path / "bug.onnx").exists()
