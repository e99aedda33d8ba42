"""The SwinUNETR foundation: the stage runner equals MONAI's forward, and foreign weights load
through the key repairs with an honest report (tensors only: pickled code is refused)."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from medalloy.errors import MedalloyError
from medalloy.models import FeatureTap
from medalloy.models.swin import build_swinunetr, load_swin_weights, run_swin_stages, swin_stage_channels, swin_stage_stride

pytest.importorskip("einops")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_swinunetr(2, 1, feature_size=12, out_channels=2).eval()


def test_stage_runner_equals_forward_and_names_shapes(net):
    x = torch.randn(2, 1, 64, 64)
    seen = {}

    def after(stage, f):
        seen[stage] = tuple(f.shape)
        return f

    with torch.no_grad():
        ref = net(x)
        out = net.out(run_swin_stages(net, x, after))
    torch.testing.assert_close(out, ref)
    for stage, shape in seen.items():
        side = 64 // swin_stage_stride(stage)
        assert shape == (2, swin_stage_channels(12)[stage], side, side), stage
    with FeatureTap(net, ["bottleneck", "dec0"]) as tap, torch.no_grad():
        net(x)
    assert tuple(tap.features["bottleneck"].shape) == (2, 192, 2, 2)


def test_replacing_a_stage_changes_the_output(net):
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a = run_swin_stages(net, x)
        b = run_swin_stages(net, x, lambda s, f: f * 0 if s == "bottleneck" else f)
    assert not torch.allclose(a, b)


def test_sides_not_divisible_by_32_refused(net):
    with pytest.raises(ValueError, match="divisible by 32"):
        run_swin_stages(net, torch.randn(1, 1, 48, 64))


def _ssl_style(net) -> dict[str, torch.Tensor]:
    """Keys as in MONAI's self-supervised model_swinvit.pt: the bare transformer, ``module.`` prefix,
    ``mlp.fc1``, plus heads the segmentation network has not."""
    out = {}
    for k, v in net.state_dict().items():
        if k.startswith("swinViT."):
            out["module." + k[len("swinViT.") :].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = v.clone() + 1.0
    out["module.rotation_head.weight"] = torch.zeros(4, 768)
    return out


def test_self_supervised_checkpoint_loads_with_report(net, tmp_path):
    source = _ssl_style(net)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": source, "epoch": 10}, path)
    target = build_swinunetr(2, 1, feature_size=12, out_channels=2)
    report = load_swin_weights(target, path)
    n_vit = sum(1 for k in net.state_dict() if k.startswith("swinViT."))
    assert report.loaded == n_vit and report.unexpected == ["rotation_head.weight"]
    assert report.missing and all(not k.startswith("swinViT.") for k in report.missing)
    torch.testing.assert_close(target.swinViT.layers1[0].blocks[0].mlp.linear1.weight, net.swinViT.layers1[0].blocks[0].mlp.linear1.weight + 1.0)
    assert "tensors loaded" in str(report)


def test_safetensors_with_wrapper_prefix_and_renamed_transformer(net, tmp_path):
    state = {("module." + k.replace("swinViT.", "swin_vit.")): v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    target = build_swinunetr(2, 1, feature_size=12, out_channels=2)
    report = load_swin_weights(target, path)
    assert report.loaded == len(net.state_dict()) and not report.missing and not report.unexpected
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), net(x))


def test_other_sizes_are_skipped_and_nothing_fitting_is_an_error(net, tmp_path):
    other = build_swinunetr(2, 1, feature_size=24, out_channels=2)
    path = tmp_path / "fs24.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    target = build_swinunetr(2, 1, feature_size=12, out_channels=2)
    before = target.swinViT.patch_embed.proj.weight.clone()
    report = load_swin_weights(target, path)
    assert len(report.mismatched) > 100 and "of another shape" in str(report)
    torch.testing.assert_close(target.swinViT.patch_embed.proj.weight, before)  # skipped, not half-copied
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(foreign))
    with pytest.raises(MedalloyError, match="no tensor fits") as err:
        load_swin_weights(target, foreign)
    assert "foreign.safetensors" in str(err.value)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": Evil()}}, fh)
    target = build_swinunetr(2, 1, feature_size=12, out_channels=2)
    with pytest.raises(MedalloyError, match="cannot read as tensors only"):
        load_swin_weights(target, path)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(MedalloyError, match="no such weights file"):
        load_swin_weights(target, tmp_path / "absent.pt")
