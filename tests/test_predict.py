"""Prediction's one way in and one loop: ``load_model`` resolves a run folder, a checkpoint and an
exported ONNX graph (nnU-Net folders: tests/interop/test_nnunet.py) and refuses anything else in
one line; the writers put exactly what the probabilities say into label maps, per-task masks and
``.npz`` files, and ``predict_folder`` wires them to its input's names and geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medalloy.data.io import read_image, read_label
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.inference import Predictor
from medalloy.errors import MedalloyError
from medalloy.models.unet import build_unet
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan
from medalloy.predict import CaseImage, LabelWriter, ProbabilityWriter, TaskMaskWriter, predict_folder
from medalloy.recipes.registry import MEDALLOY, ONNX, Source, load_model, load_task_model, resolve_source

LABELS = {"background": 0, "lung": 2, "heart": 5}  # values that are not class indices: a writer must map them


def _plan() -> Plan:
    network = NetworkPlan(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[4, 8, 8])
    return Plan(
        dataset="toy", dim=2, in_channels=1, target_spacing=[1.0, 1.0], patch_size=[16, 16], batch_size=2,
        normalization=[ChannelNorm(scheme="zscore")], label_values=sorted(LABELS.values()), labels=LABELS, network=network,
    )  # fmt: skip


@pytest.fixture
def run(tmp_path):
    """A run folder holding only ``last`` (``best`` falls back to it) of an untrained expert."""
    plan = _plan()
    torch.manual_seed(0)
    net = build_unet(plan.network, plan.in_channels, plan.num_classes)
    record = {"method": "expert", "plan": plan.model_dump(mode="json"), "tasks": [{"dataset": "toy", "labels": LABELS}]}
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors", ckpt.prefixed(net.state_dict(), "model/net"), record)
    return tmp_path / "run"


def test_run_folder_and_checkpoint_resolve_to_the_same_model(run):
    last = run / "checkpoints" / "last.safetensors"
    assert resolve_source(run) == resolve_source(run, "last") == resolve_source(last) == Source(MEDALLOY, last)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    (a, plan, record), (b, _, _) = load_model(run), load_model(last, which="last")
    assert plan == _plan() and record["method"] == "expert" and not a.training
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_a_folder_that_is_no_model_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    for call in (lambda: load_model(tmp_path / "notes"), lambda: load_task_model(tmp_path / "notes", ["lung"])):
        with pytest.raises(MedalloyError, match="no best checkpoint; train first") as exc:
            call()
        assert "\n" not in str(exc.value) and str(exc.value).startswith(str(tmp_path / "notes"))


def test_an_onnx_graph_loads_with_its_sidecar_and_refuses_tasks(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from medalloy.interop.onnx_runtime import INPUT, OUTPUT, SIDECAR_FORMAT, OnnxModule, file_sha256, sidecar_path

    graph = tmp_path / "m.onnx"
    spatial = ["batch", 1, "height", "width"]
    nodes = [helper.make_node("Mul", [INPUT, "two"], [OUTPUT])]  # logits = 2 * image: this graph and no other
    model = helper.make_model(
        helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, spatial)], [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, spatial)],
            [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    model.ir_version = 8
    onnx.save(model, str(graph))
    side = {"format": SIDECAR_FORMAT, "onnx_sha256": file_sha256(graph), "plan": _plan().model_dump(mode="json"), "method": "expert", "activation": "softmax"}
    sidecar_path(graph).write_text(json.dumps(side))
    assert resolve_source(graph, "last") == Source(ONNX, graph)
    module, plan, meta = load_model(graph, dataset="ignored: bound at export")
    x = torch.randn(2, 1, 8, 12, generator=torch.Generator().manual_seed(2))
    assert isinstance(module, OnnxModule) and plan == _plan() and meta["method"] == "expert"
    assert torch.equal(module(x), 2 * x)
    with pytest.raises(MedalloyError, match="predicts the tasks it was exported for, not --task") as exc:
        load_task_model(graph, ["lung"])
    assert "\n" not in str(exc.value) and str(graph) in str(exc.value)


def _case(tmp_path, shape=(4, 5)) -> CaseImage:
    path = tmp_path / "c1_0000.png"
    Image.fromarray(np.zeros(shape, np.uint8)).save(path)
    image, meta = read_image(path)
    return CaseImage("c1", image, meta, path, ".png", meta)


def test_label_writer_maps_classes_to_label_values_and_keeps_only_the_kept(tmp_path):
    case = _case(tmp_path)
    classes = np.array([[0, 1, 2, 2, 1], [1, 0, 0, 2, 2], [2, 2, 1, 1, 0], [0, 0, 0, 1, 2]])
    probs = torch.from_numpy(np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1) * 0.7 + 0.1)  # (K, H, W)
    predictor = Predictor(torch.nn.Identity(), _plan())
    writer, kept = LabelWriter(tmp_path / "all"), LabelWriter(tmp_path / "heart", keep=[5])
    writer(case, probs, predictor)
    kept(case, probs, predictor)
    assert writer.written == [tmp_path / "all" / "c1.png"] and kept.written == [tmp_path / "heart" / "c1.png"]
    values = np.array([0, 2, 5])[classes]
    np.testing.assert_array_equal(read_label(tmp_path / "all" / "c1.png")[0], values)
    np.testing.assert_array_equal(read_label(tmp_path / "heart" / "c1.png")[0], np.where(values == 5, 5, 0))


def test_task_masks_overlap_and_probabilities_keep_float16(tmp_path):
    case = _case(tmp_path)
    rng = np.random.default_rng(3)
    probs = torch.from_numpy(rng.random((2, 4, 5)).astype(np.float32))  # sigmoid maps of two tasks
    predictor = Predictor(torch.nn.Identity(), _plan(), activation="sigmoid")
    masks, npz = TaskMaskWriter(tmp_path / "out", ["lung", "heart"]), ProbabilityWriter(tmp_path / "out")
    masks(case, probs, predictor)
    npz(case, probs, predictor)
    assert masks.written == [tmp_path / "out" / "lung" / "c1.png", tmp_path / "out" / "heart" / "c1.png"]
    for k, task in enumerate(["lung", "heart"]):
        np.testing.assert_array_equal(read_label(tmp_path / "out" / task / "c1.png")[0], (probs[k].numpy() > 0.5).astype(np.uint8))
    assert ((probs > 0.5).all(0)).any()  # both tasks at once somewhere: masks, not one label map
    saved = np.load(npz.written[0])["probabilities"]
    assert npz.written == [tmp_path / "out" / "c1.npz"] and saved.dtype == np.float16
    np.testing.assert_array_equal(saved, probs.numpy().astype(np.float16))


def test_predict_folder_writes_each_case_in_its_format_with_its_probabilities(run, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(inp / "a_0000.png")
    Image.fromarray(rng.integers(0, 256, (18, 16), dtype=np.uint8)).save(inp / "b.jpg")  # no channel suffix; masks are lossless
    written = predict_folder(run, inp, out, probabilities=True, device="cpu", precision="fp32", progress=False)
    assert written == [out / "a.png", out / "b.png"] and sorted(p.name for p in out.iterdir()) == ["a.npz", "a.png", "b.npz", "b.png"]
    model, plan, _ = load_model(run)
    predictor = Predictor(model, plan, precision="fp32")
    for case, src in (("a", inp / "a_0000.png"), ("b", inp / "b.jpg")):
        image, meta = read_image(src)
        probs = predictor.predict_probabilities(image, meta, src)
        np.testing.assert_array_equal(read_label(out / f"{case}.png")[0], predictor.to_labels(probs))
        np.testing.assert_array_equal(np.load(out / f"{case}.npz")["probabilities"], probs.numpy().astype(np.float16))
    with pytest.raises(MedalloyError, match="predictions exist already"):
        predict_folder(run, inp, out, device="cpu", progress=False)
