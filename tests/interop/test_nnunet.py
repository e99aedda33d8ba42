"""nnU-Net v2 model folders as experts: weights, stages, plan mapping (axes!), safe loading, predict."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dynamic_network_architectures")

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402
from PIL import Image  # noqa: E402

from medalloy.cli import main  # noqa: E402
from medalloy.data.preprocess import normalize  # noqa: E402
from medalloy.errors import MedalloyError  # noqa: E402
from medalloy.interop import nnunet  # noqa: E402
from medalloy.interop.nnunet import is_nnunet_folder, load_nnunet_expert, nnunet_checkpoint, nnunet_stage_channels  # noqa: E402
from medalloy.models.features import STAGES_ATTR, FeatureTap, stage_names  # noqa: E402
from medalloy.planning.plan import ChannelNorm  # noqa: E402

ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3], [3, 3], [3, 3]],
        "strides": [[1, 1], [2, 2], [2, 2]],
        "n_conv_per_stage": [2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
LABELS = {"background": 0, "lung": 1, "heart": 2}


def _plans(reader: str = "NaturalImage2DIO", schemes: list[str] | None = None) -> dict:
    schemes = schemes or ["ZScoreNormalization"]
    return {
        "dataset_name": "Dataset102_Toy",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, 32, 32],
        "image_reader_writer": reader,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": {
                "data_identifier": "nnUNetPlans_2d",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 12,
                "patch_size": [32, 32],
                "median_image_size_in_voxels": [32.0, 32.0],
                "spacing": [1.0, 1.0],
                "normalization_schemes": schemes,
                "use_mask_for_norm": [False] * len(schemes),
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "architecture": copy.deepcopy(ARCH),
                "batch_dice": True,
            },
            "2d_small": {"inherits_from": "2d", "batch_size": 4, "patch_size": [16, 16]},
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 255.0, "mean": 100.0 + c, "median": 98.0, "min": 0.0, "percentile_00_5": 3.0, "percentile_99_5": 250.0, "std": 40.0}
            for c in range(len(schemes))
        },
    }


def _dataset_json(channels: int = 1, ending: str = ".png") -> dict:
    return {"channel_names": {str(c): f"ch{c}" for c in range(channels)}, "labels": dict(LABELS), "numTraining": 2, "file_ending": ending}


def _network(plans: dict, cfg: str = "2d", channels: int = 1, classes: int = 3) -> PlainConvUNet:
    kw = dict(plans["configurations"]["2d"]["architecture"]["arch_kwargs"])
    kw.update(conv_op=torch.nn.Conv2d, norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU)
    net = PlainConvUNet(input_channels=channels, num_classes=classes, deep_supervision=True, **kw)  # nnU-Net trains with deep supervision
    net.apply(PlainConvUNet.initialize)
    with torch.no_grad():  # InstanceNorm's affine starts at 1/0: make it matter
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _checkpoint(net: torch.nn.Module, plans: dict, dataset_json: dict, cfg: str = "2d", prefix: str = "") -> dict:
    """Shaped like nnU-Net's ``nnUNetTrainer.save_checkpoint``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    return {
        "network_weights": {prefix + k: v for k, v in net.state_dict().items()},
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.float64(0.25), np.float64(0.5)],
            "ema_fg_dice": [np.float64(0.25), np.float64(0.275)],
            "dice_per_class_or_region": [[np.float64(0.2), np.float64(0.3)], [np.float64(0.4), np.float64(0.6)]],
            "train_losses": [np.float32(-0.1), np.float32(-0.3)],
            "val_losses": [np.float32(-0.05), np.float32(-0.2)],
            "lrs": [0.01, 0.0099],
            "epoch_start_timestamps": [1.0, 2.0],
            "epoch_end_timestamps": [1.5, 2.5],
        },
        "_best_ema": np.float64(0.275),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": cfg, "fold": 0, "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1),
    }


def _folder(
    root: Path, plans: dict | None = None, dataset_json: dict | None = None, cfg: str = "2d", fold: str = "fold_0", net=None, **kw
) -> tuple[Path, PlainConvUNet]:
    """``root/Dataset102_Toy/nnUNetTrainer__nnUNetPlans__CFG/FOLD/checkpoint_final.pth`` as nnU-Net writes it."""
    import json

    plans = plans or _plans()
    dataset_json = dataset_json or _dataset_json()
    trainer = root / "Dataset102_Toy" / f"nnUNetTrainer__nnUNetPlans__{cfg}"
    (trainer / fold).mkdir(parents=True, exist_ok=True)
    (trainer / "plans.json").write_text(json.dumps(plans))
    (trainer / "dataset.json").write_text(json.dumps(dataset_json))
    net = net if net is not None else _network(plans, channels=len(dataset_json["channel_names"]))
    torch.save(_checkpoint(net, plans, dataset_json, cfg, **kw), trainer / fold / "checkpoint_final.pth")
    return trainer, net


def _logits(net: PlainConvUNet, x: torch.Tensor) -> torch.Tensor:
    net.decoder.deep_supervision = False  # as nnU-Net's predictor does
    with torch.no_grad():
        return net(x)


def test_weights_load_and_outputs_match(tmp_path):
    trainer, orig = _folder(tmp_path, prefix="_orig_mod.")  # torch.compile's prefix is stripped
    assert is_nnunet_folder(trainer) and is_nnunet_folder(trainer / "fold_0") and not is_nnunet_folder(tmp_path)
    net, plan, record = load_nnunet_expert(trainer)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, _logits(orig, x), atol=1e-5)
    assert record["method"] == "nnunet" and record["activation"] == "softmax" and record["configuration"] == "2d"
    assert record["trainer"] == "nnUNetTrainer" and record["fold"] == "0" and record["epoch"] == 2
    assert record["tasks"] == [{"dataset": "Dataset102_Toy", "folder": "Dataset102_Toy", "labels": LABELS, "modality": "ch0", "file_ending": ".png"}]
    assert record["source"] == str(trainer)


def test_feature_tap_reads_stages_with_medalloy_names(tmp_path):
    trainer, _ = _folder(tmp_path)
    net, _, _ = load_nnunet_expert(trainer / "fold_0")
    assert nnunet.STAGES_ATTR == STAGES_ATTR  # spelled out in interop (layering)
    assert stage_names(net) == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
    assert nnunet_stage_channels(net) == {"enc0": 4, "enc1": 8, "bottleneck": 16, "dec1": 8, "dec0": 4}
    with torch.no_grad(), FeatureTap(net, ["bottleneck", "dec1", "dec0"]) as tap:
        net(torch.randn(2, 1, 32, 32))
    assert tap.features["bottleneck"].shape == (2, 16, 8, 8)
    assert tap.features["dec1"].shape == (2, 8, 16, 16)
    assert tap.features["dec0"].shape == (2, 4, 32, 32)


def test_plan_follows_the_plans(tmp_path):
    trainer, _ = _folder(tmp_path)
    _, plan, _ = load_nnunet_expert(trainer)
    assert plan.dim == 2 and plan.slice_axis is None and plan.in_channels == 1
    assert plan.target_spacing == [1.0, 1.0] and plan.patch_size == [32, 32] and plan.batch_size == 12
    assert plan.normalization == [ChannelNorm(scheme="zscore")]
    assert plan.labels == LABELS and plan.label_values == [0, 1, 2]
    assert plan.network.architecture == "nnUNet" and plan.network.filters == [4, 8, 16] and plan.network.norm == "instance"
    assert plan.network.strides == [[1, 1], [2, 2], [2, 2]] and plan.network.deep_supervision is False


def test_inherited_configuration_and_every_normalisation(tmp_path):
    schemes = ["CTNormalization", "RescaleTo01Normalization", "RGBTo01Normalization", "NoNormalization"]
    plans = _plans(schemes=schemes)
    trainer, _ = _folder(tmp_path, plans=plans, dataset_json=_dataset_json(channels=4), cfg="2d_small")
    _, plan, record = load_nnunet_expert(trainer)
    assert record["configuration"] == "2d_small" and plan.patch_size == [16, 16] and plan.batch_size == 4
    assert plan.normalization == [
        ChannelNorm(scheme="ct", clip_low=3.0, clip_high=250.0, mean=100.0, std=40.0),
        ChannelNorm(scheme="rescale01"),
        ChannelNorm(scheme="rgb"),
        ChannelNorm(scheme="none"),
    ]


def test_rescale01_is_nnunets_min_max():
    image = np.array([[[2.0, 4.0], [6.0, 10.0]]])
    assert np.allclose(normalize(image, [ChannelNorm(scheme="rescale01")]), [[[0.0, 0.25], [0.5, 1.0]]])
    assert np.allclose(normalize(np.full((1, 2, 2), 7.0), [ChannelNorm(scheme="rescale01")]), 0.0)


def test_nifti_axes_are_mapped_by_permuting_the_kernels(tmp_path):
    # SimpleITK reads NIfTI reversed: nnU-Net's 2D axes (y, x) are medalloy's (i=x, j=y) swapped.
    plans = _plans(reader="SimpleITKIO")
    cfg = plans["configurations"]["2d"]
    cfg.update(spacing=[0.5, 2.0], patch_size=[32, 16], median_image_size_in_voxels=[40.0, 20.0])
    cfg["architecture"]["arch_kwargs"].update(kernel_sizes=[[3, 1], [3, 3], [1, 3]], strides=[[1, 1], [2, 1], [2, 2]])
    trainer, orig = _folder(tmp_path, plans=plans, dataset_json=_dataset_json(ending=".nii.gz"))
    net, plan, _ = load_nnunet_expert(trainer)
    assert plan.target_spacing == [2.0, 0.5] and plan.patch_size == [16, 32] and plan.median_shape == [20, 40]
    assert plan.network.kernels == [[1, 3], [3, 3], [3, 1]] and plan.network.strides == [[1, 1], [1, 2], [2, 2]]
    assert plan.slice_axis == 2  # nnU-Net slices its first axis (z), medalloy's last
    x = torch.randn(1, 1, 16, 32)  # medalloy's (i, j)
    with torch.no_grad():
        out = net(x)
    assert torch.allclose(out, _logits(orig, x.transpose(-1, -2)).transpose(-1, -2), atol=1e-5)


def test_simpleitk_on_png_keeps_the_axes(tmp_path):
    plans = _plans(reader="SimpleITKIO")
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"].update(kernel_sizes=[[3, 1], [3, 3], [1, 3]], strides=[[1, 1], [2, 1], [2, 2]])
    trainer, orig = _folder(tmp_path, plans=plans)  # dataset.json: .png
    net, plan, _ = load_nnunet_expert(trainer)
    assert plan.slice_axis is None and plan.network.kernels[0] == [3, 1]
    x = torch.randn(1, 1, 32, 16)
    with torch.no_grad():
        assert torch.allclose(net(x), _logits(orig, x), atol=1e-5)


class _Trap:
    """Would create a file if unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_foreign_pickle_is_refused_not_run(tmp_path):
    trainer, net = _folder(tmp_path)
    marker = tmp_path / "unpickled"
    ck = _checkpoint(net, _plans(), _dataset_json())
    ck["logging"]["extra"] = _Trap(marker)
    path = trainer / "fold_0" / "checkpoint_final.pth"
    torch.save(ck, path)
    with pytest.raises(MedalloyError, match="pickled objects medalloy does not unpickle") as exc:
        load_nnunet_expert(trainer)
    assert not marker.exists() and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    trainer, _ = _folder(tmp_path)
    ckpt = trainer / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(b"not a zip")
    with pytest.raises(MedalloyError, match="not a readable PyTorch checkpoint") as exc:
        load_nnunet_expert(trainer)
    assert str(ckpt) in str(exc.value)
    ckpt.unlink()
    with pytest.raises(MedalloyError, match="checkpoint not found") as exc:
        load_nnunet_expert(trainer)
    assert str(ckpt) in str(exc.value)
    (trainer / "plans.json").unlink()
    with pytest.raises(MedalloyError, match="plans not found") as exc:
        load_nnunet_expert(trainer / "fold_0")
    assert str(trainer / "plans.json") in str(exc.value)


def test_fold_choice(tmp_path):
    trainer, _ = _folder(tmp_path, fold="fold_3")
    assert nnunet_checkpoint(trainer, "best") == trainer / "fold_3" / "checkpoint_final.pth"  # no best: final
    (trainer / "fold_3" / "checkpoint_best.pth").write_bytes(b"")
    assert nnunet_checkpoint(trainer, "best").name == "checkpoint_best.pth"
    assert nnunet_checkpoint(trainer / "fold_3", "last").name == "checkpoint_final.pth"
    (trainer / "fold_1").mkdir()
    with pytest.raises(MedalloyError, match=r"several folds \(fold_1, fold_3\)"):
        load_nnunet_expert(trainer)
    _, _, record = load_nnunet_expert(trainer / "fold_3" / "checkpoint_final.pth")
    assert record["fold"] == "3"


def _edit_region(p, d):
    d["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    d["regions_class_order"] = [1, 2]


def _edit_layer(p, d):
    p["configurations"]["2d"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"


def _edit_network(p, d):
    p["configurations"]["2d"]["architecture"]["network_class_name"] = "mypkg.Net"


def _edit_masked(p, d):
    p["configurations"]["2d"]["use_mask_for_norm"] = [True]


def _edit_reader(p, d):
    p["image_reader_writer"] = "NibabelIOWithReorient"


def _edit_labels(p, d):
    d["labels"] = {"background": 0, "lung": 1}  # the checkpoint has 3 outputs


@pytest.mark.parametrize(
    "edit, match",
    [
        (_edit_region, "region-based"),
        (_edit_layer, "layer 'os.system' is not on"),
        (_edit_network, "network 'mypkg.Net' is not supported"),
        (_edit_masked, "masked z-score"),
        (_edit_reader, "NibabelIOWithReorient"),
        (_edit_labels, "weights do not fit the network of plans.json"),
    ],
)
def test_unsupported_models_are_refused_in_one_line(tmp_path, edit, match):
    plans, ds = _plans(), _dataset_json()
    net = _network(plans)
    edit(plans, ds)
    trainer, _ = _folder(tmp_path, plans=plans, dataset_json=ds, net=net)
    with pytest.raises(MedalloyError, match=match) as exc:
        load_nnunet_expert(trainer)
    assert "\n" not in str(exc.value)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    trainer, _ = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "dynamic_network_architectures.architectures.unet", None)
    with pytest.raises(MedalloyError, match=r"medalloy\[nnunet\]"):
        load_nnunet_expert(trainer)


def test_predict_cli_writes_label_maps(tmp_path):
    trainer, orig = _folder(tmp_path)
    rng = np.random.default_rng(0)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    images = {"a_0000.png": rng.integers(0, 256, (32, 32), dtype=np.uint8), "b_0000.png": rng.integers(0, 256, (40, 36), dtype=np.uint8)}
    for name, img in images.items():
        Image.fromarray(img).save(inp / name)
    args = ["-q", "predict", str(trainer), "--input", str(inp), "--output", str(out), "--precision", "fp32", "--probabilities", "--device", "cpu"]
    assert main(args) == 0
    for case, img in (("a", images["a_0000.png"]), ("b", images["b_0000.png"])):
        label = np.asarray(Image.open(out / f"{case}.png"))
        assert label.shape == img.shape and set(np.unique(label)) <= {0, 1, 2}
    # One patch-sized image: the probabilities are nnU-Net's network on nnU-Net's z-score.
    a = images["a_0000.png"].astype(np.float64)
    x = torch.from_numpy(((a - a.mean()) / a.std()).astype(np.float32))[None, None]
    expected = torch.softmax(_logits(orig, x), 1)[0].numpy()
    probs = np.load(out / "a.npz")["probabilities"].astype(np.float32)
    assert np.abs(probs - expected).max() < 2e-3


def test_3d_configuration_with_transpose_forward(tmp_path):
    # nnU-Net network axes = reader axes t = (2, 0, 1) = (x, z, y); medalloy's are nibabel's (x, y, z).
    plans = _plans(reader="SimpleITKIO")
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    cfg = plans["configurations"]["2d"]  # reused as a 3D configuration: only its name differs
    cfg.update(spacing=[1.0, 3.0, 2.0], patch_size=[16, 8, 12], median_image_size_in_voxels=[30.0, 10.0, 20.0])
    kw = cfg["architecture"]["arch_kwargs"]
    kw.update(conv_op="torch.nn.modules.conv.Conv3d", norm_op="torch.nn.modules.instancenorm.InstanceNorm3d")
    kw.update(kernel_sizes=[[3, 1, 3], [3, 3, 1], [1, 3, 3]], strides=[[1, 1, 1], [2, 1, 2], [2, 2, 1]])
    plans["configurations"] = {"3d_fullres": cfg}
    orig = PlainConvUNet(
        input_channels=1,
        num_classes=3,
        deep_supervision=True,
        **{**kw, "conv_op": torch.nn.Conv3d, "norm_op": torch.nn.InstanceNorm3d, "nonlin": torch.nn.LeakyReLU},
    ).eval()
    trainer, _ = _folder(tmp_path, plans=plans, dataset_json=_dataset_json(ending=".nii.gz"), cfg="3d_fullres", net=orig)
    net, plan, _ = load_nnunet_expert(trainer)
    # medalloy axis m is reader axis 2 - m: x = network axis 0, y = network axis 2, z = network axis 1.
    assert plan.dim == 3 and plan.slice_axis is None and plan.target_spacing == [1.0, 2.0, 3.0] and plan.patch_size == [16, 12, 8]
    assert plan.network.kernels == [[3, 3, 1], [3, 1, 3], [1, 3, 3]] and plan.median_shape == [30, 20, 10]
    x = torch.randn(1, 1, 16, 12, 8)
    with torch.no_grad():
        out = net(x)
    expected = _logits(orig, x.permute(0, 1, 2, 4, 3)).permute(0, 1, 2, 4, 3)
    assert torch.allclose(out, expected, atol=1e-5)


def test_residual_encoder_unet(tmp_path):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    plans = _plans()
    arch = plans["configurations"]["2d"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kw = arch["arch_kwargs"]
    kw["n_blocks_per_stage"] = kw.pop("n_conv_per_stage")
    orig = ResidualEncoderUNet(
        input_channels=1,
        num_classes=3,
        deep_supervision=True,
        **{**kw, "conv_op": torch.nn.Conv2d, "norm_op": torch.nn.InstanceNorm2d, "nonlin": torch.nn.LeakyReLU},
    ).eval()
    trainer, _ = _folder(tmp_path, plans=plans, net=orig)
    net, plan, _ = load_nnunet_expert(trainer)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad(), FeatureTap(net, ["enc1", "dec0"]) as tap:
        out = net(x)
    assert torch.allclose(out, _logits(orig, x), atol=1e-5) and plan.network.res_block
    assert tap.features["enc1"].shape == (1, 8, 16, 16) and tap.features["dec0"].shape == (1, 4, 32, 32)


def test_checkpoint_written_under_numpy_1_loads(tmp_path):
    # numpy < 2 pickles its scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core...).
    import zipfile

    trainer, _ = _folder(tmp_path)
    path = trainer / "fold_0" / "checkpoint_final.pth"
    old = tmp_path / "old.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
                assert b"numpy.core.multiarray\nscalar" in data
            dst.writestr(info, data)
    old.replace(path)
    _, _, record = load_nnunet_expert(trainer)
    assert record["epoch"] == 2


def test_an_nnunet_expert_amalgamated_is_frozen_inside_and_rebuilt_from_the_checkpoint(tmp_path):
    """``medalloy amalgamate --experts NNUNET_FOLDER``: the imported network lends its features, its
    weights leave training bit-identical, and the amalgamated checkpoint rebuilds it without the folder."""
    pytest.importorskip("einops")
    from medalloy.data.synth import generate_dataset
    from medalloy.engine import checkpoint as ckpt
    from medalloy.recipes.amalgamate import AmalgamateConfig, load_amalgamated, train_amalgamate

    trainer, net = _folder(tmp_path / "nnUNet_results")
    data = generate_dataset("Dataset902_SynthCXR", tmp_path / "raw", seed=1, cases_per_source=3, test_cases_per_source=1, progress=False)
    cfg = AmalgamateConfig(folds=3, max_val_cases=1, max_2d_side=64, width=16, batch_size=2)
    cfg.train.steps, cfg.train.val_every = 2, 2
    res = train_amalgamate([data], [trainer], tmp_path / "ka", config=cfg, progress=False)
    assert res["experts"] == [str(trainer)]
    path = tmp_path / "ka" / "checkpoints" / "last.safetensors"
    record = ckpt.read_record(path)
    assert record["spec"]["experts"][0]["kind"] == "nnunet" and record["kd_pairs"] == {}  # the expert of another dataset (Toy) lends features only
    shutil.rmtree(tmp_path / "nnUNet_results")  # the checkpoint alone must suffice
    model, _, _, _ = load_amalgamated(path)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.experts.experts[0](x), _logits(net, x), atol=1e-5, rtol=1e-4)


def test_load_model_takes_every_nnunet_source_and_each_use_its_checkpoint(tmp_path):
    """The registry's one way in: a TRAINER folder, a fold or a ``.pth`` all resolve to the fold's
    checkpoint; ``best`` (predict, export) prefers checkpoint_best.pth, a frozen expert (amalgamate)
    keeps nnU-Net's own default, checkpoint_final.pth; per-task prediction is refused in one line."""
    from medalloy.recipes.amalgamate import load_frozen_expert
    from medalloy.recipes.registry import NNUNET, Source, load_model, load_task_model, resolve_source

    trainer, final_net = _folder(tmp_path)
    final = trainer / "fold_0" / "checkpoint_final.pth"
    for source in (trainer, trainer / "fold_0", final):
        assert resolve_source(source) == Source(NNUNET, final)  # no best yet: final
    torch.manual_seed(7)
    best_net = _network(_plans())
    torch.save(_checkpoint(best_net, _plans(), _dataset_json()), trainer / "fold_0" / "checkpoint_best.pth")
    assert resolve_source(trainer) == Source(NNUNET, trainer / "fold_0" / "checkpoint_best.pth")
    assert resolve_source(trainer, "last").path == resolve_source(trainer, None).path == final
    x = torch.randn(1, 1, 32, 32)
    assert not torch.allclose(_logits(best_net, x), _logits(final_net, x), atol=1e-3)  # the two checkpoints tell apart
    for source, which, net in ((trainer, "best", best_net), (trainer, "last", final_net), (final, "best", final_net)):
        model, plan, record = load_model(source, which=which)
        assert record["method"] == "nnunet" and plan.labels == LABELS
        with torch.no_grad():
            torch.testing.assert_close(model(x), _logits(net, x), atol=1e-5, rtol=1e-4)
    expert, _, _, spec = load_frozen_expert(trainer)
    assert spec["kind"] == "nnunet" and spec["source"] == str(trainer)
    with torch.no_grad():
        torch.testing.assert_close(expert(x), _logits(final_net, x), atol=1e-5, rtol=1e-4)
    with pytest.raises(MedalloyError, match="an nnU-Net model has no per-task outputs; predict label maps without --task") as exc:
        load_task_model(trainer, ["lung"])
    assert "\n" not in str(exc.value) and str(trainer / "fold_0" / "checkpoint_best.pth") in str(exc.value)


@pytest.mark.slow
def test_an_nnunet_model_exports_to_onnx_and_an_onnx_graph_does_not(tmp_path):
    """``medalloy export NNUNET_FOLDER``: export loads through the same registry as predict, so the
    graph computes the imported network; a graph given again is refused in one line."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from medalloy.export import export_onnx
    from medalloy.interop.onnx_runtime import load_onnx

    trainer, net = _folder(tmp_path)
    out = tmp_path / "nn.onnx"
    meta = export_onnx(trainer, out)
    assert meta["method"] == "nnunet" and meta["exported_from"] == str(trainer / "fold_0" / "checkpoint_final.pth") and meta["labels"] == LABELS
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    assert float((load_onnx(out)[0](x) - _logits(net, x)).abs().max()) < 1e-3
    with pytest.raises(MedalloyError, match="an exported ONNX graph already; export the run or checkpoint it was exported from") as exc:
        export_onnx(out, tmp_path / "again.onnx")
    assert "\n" not in str(exc.value) and not (tmp_path / "again.onnx").exists()
