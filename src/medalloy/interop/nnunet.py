"""Trained nnU-Net v2 model folders as medalloy experts.

An nnU-Net results folder ``nnUNet_results/DatasetNNN_Name/TRAINER__PLANS__CONFIGURATION`` holds
``plans.json`` and ``dataset.json``, and one ``fold_X/`` per fold with ``checkpoint_final.pth``
and/or ``checkpoint_best.pth``. :func:`load_nnunet_expert` builds the network with nnU-Net's own
architecture package (``dynamic_network_architectures``), loads the weights without unpickling
code, and describes the model as a medalloy :class:`~medalloy.planning.plan.Plan`, so that
``medalloy predict FOLDER`` and :class:`~medalloy.models.features.FeatureTap` work on it as on an
expert of medalloy's own.

Axis order. medalloy's arrays keep the file's axes: ``(H, W)`` for PNG/JPG, nibabel's ``(i, j, k)``
for NIfTI (``medalloy.data.io``). nnU-Net reads an image, reorders its axes by ``transpose_forward``
``t`` (coarsest spacing first), and a ``2d`` configuration slices axis ``t[0]`` and convolves
``(t[1], t[2])``; ``spacing`` and ``patch_size`` in plans.json are in that transposed order::

    nnU-Net reader                         reader axes r = 0, 1, 2      medalloy axis of reader axis r
    NaturalImage2DIO (SimpleITKIO on PNG)  (1, H, W)                    r - 1 (r = 0: the dummy slice)
    SimpleITKIO, NibabelIO on NIfTI        (k, j, i), i.e. reversed     2 - r

So a ``2d`` model of PNGs convolves medalloy's ``(H, W)`` as they are, while a ``2d`` model of NIfTI
volumes (usually ``t = (0, 1, 2)``) slices medalloy's axis 2 and convolves ``(j, i)``: medalloy's
in-plane axes swapped. Where the orders differ, the loader builds the network with the per-axis
kernel sizes and strides permuted into medalloy's order and permutes the spatial axes of every
convolution weight likewise, so the network computes exactly nnU-Net's function on medalloy's
arrays and its stage features come out in medalloy's axis order; the plan's ``target_spacing``,
``patch_size``, ``kernels``, ``strides`` and ``median_shape`` are in medalloy's order, and
``slice_axis`` (2D configurations on volumes) is the medalloy axis nnU-Net slices. Readers whose
axes medalloy cannot reproduce (``NibabelIOWithReorient`` reorients to RAS, ``Tiff3DIO``, custom
ones) are refused.

What medalloy does differently from ``nnUNetv2_predict`` (written into the plan's ``notes``): no
crop to the non-zero region, linear instead of cubic-spline resampling, and its own mirroring axes
when ``--tta`` is given.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan

METHOD = "nnunet"
# medalloy.models.features.STAGES_ATTR, spelled out: interop sits below models and engine (tests/test_layers.py).
STAGES_ATTR = "medalloy_stages"
CHANNELS_ATTR = "medalloy_stage_channels"
CHECKPOINTS = {"best": "checkpoint_best.pth", "last": "checkpoint_final.pth"}
INSTALL = 'install it after torch: pip install "medalloy[nnunet]"'

_UNET_MODULE = "dynamic_network_architectures.architectures.unet"
_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")  # both: encoder.stages + decoder.stages
# plans.json names layer classes by dotted path (``_kw_requires_import``). They are looked up among
# these torch.nn layers (and two nnU-Net residual blocks), never imported by name: a plans file
# must not be able to make medalloy import or call anything else.
_TORCH_PATHS = ("torch.nn", "torch.nn.modules.conv", "torch.nn.modules.instancenorm", "torch.nn.modules.batchnorm", "torch.nn.modules.normalization", "torch.nn.modules.dropout", "torch.nn.modules.activation")  # fmt: skip
_TORCH_LAYERS = frozenset(
    ["Conv1d", "Conv2d", "Conv3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm"]
    + ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU"]
)
_DNA_BLOCKS = {"dynamic_network_architectures.building_blocks.residual." + n: n for n in ("BasicBlockD", "BottleneckD")}
_NORMS = {"ZScoreNormalization": "zscore", "CTNormalization": "ct", "RescaleTo01Normalization": "rescale01", "RGBTo01Normalization": "rgb", "NoNormalization": "none"}  # fmt: skip
_NATURAL = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def is_nnunet_folder(path: str | Path) -> bool:
    """True for a folder that looks like a trained nnU-Net v2 model: a ``TRAINER__PLANS__CONFIG``
    folder (``plans.json``) or one of its ``fold_X`` folders (``checkpoint_*.pth``)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / "plans.json").is_file() or any(p.glob("checkpoint_*.pth")) or (p.name.startswith("fold_") and (p.parent / "plans.json").is_file())


def nnunet_checkpoint(folder: str | Path, which: str = "last") -> Path:
    """The checkpoint file of a model folder: ``last`` is ``checkpoint_final.pth``, ``best`` is
    ``checkpoint_best.pth`` (``checkpoint_final.pth`` when there is none, as medalloy's ``best``
    falls back to ``last``)."""
    fold = _fold_folder(Path(folder))
    name = CHECKPOINTS.get(which, which)
    if which == "best" and not (fold / name).is_file():
        name = CHECKPOINTS["last"]
    return fold / name


def nnunet_stage_channels(net: nn.Module) -> dict[str, int]:
    """Channels of each stage :class:`~medalloy.models.features.FeatureTap` reads, by stage name
    (``enc0`` ... ``bottleneck`` ... ``dec0``): features are ``(B, channels[name], *spatial)``."""
    channels = getattr(getattr(net, "module", net), CHANNELS_ATTR, None)
    if channels is None:
        raise MedalloyError(f"{type(net).__name__} was not loaded by load_nnunet_expert", fix="load the model with medalloy.interop.nnunet")
    return dict(channels)


def load_nnunet_expert(folder: str | Path, device: str = "cpu", checkpoint: str = "checkpoint_final.pth") -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Network, plan and record of a trained nnU-Net v2 model.

    ``folder``: the ``TRAINER__PLANS__CONFIG`` folder (its ``fold_0``, or its only fold), a
    ``fold_X`` folder, or a checkpoint file in one (then ``checkpoint`` is not used). The network
    maps ``(B, C, *patch)`` to logits ``(B, K, *patch)`` (no deep supervision) with
    ``C`` = the channels of ``dataset.json`` and ``K`` = its labels, spatial axes in medalloy's
    order (module doc); it exposes ``medalloy_stages`` for ``FeatureTap`` and
    :func:`nnunet_stage_channels`."""
    path = Path(folder)
    if path.is_file() or path.suffix == ".pth":
        fold, ckpt_path = _fold_folder(path.parent), path
    else:
        fold = _fold_folder(path)
        ckpt_path = fold / checkpoint
    trainer_dir = fold.parent
    plans_path, ds_path = trainer_dir / "plans.json", trainer_dir / "dataset.json"
    fix = "give an nnU-Net v2 results folder (TRAINER__PLANS__CONFIG with plans.json and dataset.json, fold_X inside)"
    plans = read_json(plans_path, "nnU-Net plans", fix)
    dataset_json = read_json(ds_path, "nnU-Net dataset.json", fix)
    ck = _read_checkpoint(ckpt_path)
    init_args = ck.get("init_args") if isinstance(ck.get("init_args"), dict) else {}
    parts = trainer_dir.name.split("__")
    cfg_name = parts[-1] if len(parts) == 3 else init_args.get("configuration")
    if not isinstance(cfg_name, str) or (init_args.get("configuration") not in (None, cfg_name)):
        raise MedalloyError(
            f"configuration unclear (folder says {parts[-1] if len(parts) == 3 else None!r}, checkpoint {init_args.get('configuration')!r})",
            ckpt_path,
            "keep nnU-Net's folder names (TRAINER__PLANS__CONFIG/fold_X)",
        )
    cfg = _configuration(plans, cfg_name, plans_path)
    plan, perm = _plan(plans, cfg, dataset_json, cfg_name, plans_path, ds_path)
    net, channels = _network(cfg, plan, perm, plans_path)
    state = _weights(ck, ckpt_path)
    if perm != sorted(perm):  # nnU-Net's axes -> medalloy's: permute the kernels' spatial axes likewise
        state = {k: v.permute(0, 1, *[2 + a for a in perm]).contiguous() if v.ndim == 2 + plan.dim else v for k, v in state.items()}
    try:
        net.load_state_dict(state)  # strict: every weight of the checkpoint, none missing
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = (lines[1] if len(lines) > 1 else lines[0]).rstrip(".")[:200]
        raise MedalloyError(
            f"weights do not fit the network of plans.json ({why})", ckpt_path, "use the checkpoint with the plans.json of its own folder"
        ) from None
    setattr(net, STAGES_ATTR, _stages(len(plan.network.filters)))
    setattr(net, CHANNELS_ATTR, channels)
    trainer = parts[0] if len(parts) == 3 else ck.get("trainer_name")
    record = {
        "method": METHOD,
        "name": f"nnunet-{plan.dataset}-{cfg_name}",
        "tasks": [
            {
                "dataset": plan.dataset,
                "folder": plans.get("dataset_name", plan.dataset),
                "labels": plan.labels,
                "modality": _modality(dataset_json),
                "file_ending": dataset_json.get("file_ending"),
            }
        ],
        "activation": "softmax",
        "source": str(folder),
        "configuration": cfg_name,
        "trainer": trainer,
        "plans": plans.get("plans_name", parts[1] if len(parts) == 3 else None),
        "fold": fold.name.removeprefix("fold_"),
        "checkpoint": ckpt_path.name,
        "epoch": ck.get("current_epoch"),
        "plan": plan.model_dump(mode="json"),
        "architecture": cfg["architecture"],  # with "plan", what build_nnunet_network needs to rebuild it
        "params": sum(p.numel() for p in net.parameters()),
    }
    return net.to(device).eval(), plan, record


def build_nnunet_network(architecture: dict[str, Any], plan: Plan) -> nn.Module:
    """The network of an imported nnU-Net model (random weights), from its record's ``architecture``
    and ``plan`` (already in medalloy's axis order): how a checkpoint that holds one rebuilds it."""
    net, channels = _network({"architecture": architecture}, plan, list(range(plan.dim)), Path("plans.json"))
    setattr(net, STAGES_ATTR, _stages(len(plan.network.filters)))
    setattr(net, CHANNELS_ATTR, channels)
    return net


# -- folders and files ---------------------------------------------------------------------------
def _fold_folder(path: Path) -> Path:
    """``fold_X`` itself, or the fold of a ``TRAINER__PLANS__CONFIG`` folder (``fold_0``, else the only one)."""
    if not path.is_dir():
        raise MedalloyError("nnU-Net model folder not found", path, "give a TRAINER__PLANS__CONFIG folder or one of its fold_X folders")
    if path.name.startswith("fold_") or not (path / "plans.json").is_file():
        return path
    folds = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("fold_"))
    if "fold_0" in folds or len(folds) == 1:
        return path / ("fold_0" if "fold_0" in folds else folds[0])
    if not folds:
        raise MedalloyError("no fold_X folder", path, "train a fold with nnU-Net first, or give the fold folder")
    raise MedalloyError(f"several folds ({', '.join(folds)}) and no fold_0", path, f"give the fold folder, e.g. {path / folds[0]}")


def _safe_globals() -> list[Any]:
    """Everything a real nnU-Net checkpoint holds besides tensors, dicts, lists, tuples, strings and
    numbers: numpy scalars (``np.float64`` dice and losses in ``logging``, ``_best_ema``), pickled
    as ``scalar(dtype, bytes)``. ``torch.device`` (``init_args``) is allowed by torch already."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = [
        type(np.dtype(t))
        for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64)
    ]
    # A checkpoint names the function as the numpy that wrote it did: numpy < 2 wrote numpy.core.
    aliases = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    return [scalar, *aliases, np.dtype, *dtypes]


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedalloyError("nnU-Net checkpoint not found", path, "give a fold folder holding checkpoint_final.pth (or checkpoint_best.pth)")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused globals, truncated zips and non-torch files all land here
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        detail = m[1] if m else f"{exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0]}"
        foreign = m is not None and detail.startswith(("Unsupported global", "Can only build"))
        why = "holds pickled objects medalloy does not unpickle" if foreign else "not a readable PyTorch checkpoint"
        raise MedalloyError(
            f"{why} ({detail.split(' was not')[0][:120]})", path, "use the .pth nnU-Net wrote (only tensors, numbers and dicts), from a source you trust"
        ) from None
    if not isinstance(ck, dict) or not isinstance(ck.get("network_weights"), dict):
        raise MedalloyError("checkpoint has no 'network_weights'", path, "give a checkpoint_final.pth or checkpoint_best.pth written by nnU-Net v2")
    return ck


def _weights(ck: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """``network_weights`` without the ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes."""
    state = {}
    for key, value in ck["network_weights"].items():
        if not isinstance(value, torch.Tensor):
            raise MedalloyError(f"network weight {key!r} is not a tensor", path, "give a checkpoint written by nnU-Net v2")
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        state[key] = value
    return state


# -- plans.json -> Plan ----------------------------------------------------------------------------
def _configuration(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The configuration with ``inherits_from`` resolved as nnU-Net does (the child's keys replace the parent's)."""
    configs = plans.get("configurations", {})
    chain: list[str] = []
    while name not in chain:
        if name not in configs:
            raise MedalloyError(
                f"configuration {name!r} not in plans.json (it has {', '.join(configs)})", path, "give the folder of a configuration these plans define"
            )
        chain.append(name)
        name = configs[name].get("inherits_from", name)
    if name != chain[-1]:
        raise MedalloyError(f"configurations inherit in a cycle ({' -> '.join([*chain, name])})", path, "fix 'inherits_from' in plans.json")
    cfg: dict[str, Any] = {}
    for n in reversed(chain):
        cfg.update(configs[n])
    if cfg.get("previous_stage"):
        raise MedalloyError(
            f"cascade configuration {chain[0]!r} needs the low-resolution stage's prediction as input", path, "import the 3d_lowres or 3d_fullres model instead"
        )
    if "architecture" not in cfg:
        raise MedalloyError("plans.json has no 'architecture' entry (written before nnU-Net v2.3)", path, "import models planned by nnU-Net v2.3 or later")
    return cfg


def _axes(plans: dict[str, Any], dataset_json: dict[str, Any], dim: int, path: Path) -> tuple[list[int], int | None]:
    """``perm[k]``: the nnU-Net network axis that is medalloy's network axis ``k``; and for a 2D
    configuration on volumes, the medalloy array axis nnU-Net slices (module doc)."""
    ending = str(dataset_json.get("file_ending", "")).lower()
    reader = (
        plans.get("image_reader_writer") or dataset_json.get("overwrite_image_reader_writer") or ("NaturalImage2DIO" if ending in _NATURAL else "SimpleITKIO")
    )
    t = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    if sorted(t) != [0, 1, 2]:
        raise MedalloyError(f"transpose_forward {t} is not a permutation of three axes", path, "use the plans.json nnU-Net wrote")
    if reader == "NaturalImage2DIO" or (reader == "SimpleITKIO" and ending in _NATURAL):
        if dim != 2 or t[0] != 0:
            raise MedalloyError(f"a {dim}D configuration with transpose_forward {t} on 2D images", path, "import the 2d configuration")
        medalloy_axis = {1: 0, 2: 1}  # reader axes (1, H, W) (SimpleITK: rows, columns too); medalloy reads (H, W)
    elif reader in ("SimpleITKIO", "NibabelIO"):
        medalloy_axis = {0: 2, 1: 1, 2: 0}  # reader axes (k, j, i); medalloy keeps nibabel's (i, j, k)
    else:
        raise MedalloyError(
            f"nnU-Net reader {reader} orders or orients voxels in a way medalloy does not reproduce",
            path,
            "import models planned with SimpleITKIO, NibabelIO or NaturalImage2DIO",
        )
    net_axes = t[1:] if dim == 2 else t
    perm = sorted(range(dim), key=lambda a: medalloy_axis[net_axes[a]])  # medalloy's 2D slices keep the in-plane axes ascending
    slice_axis = medalloy_axis.get(t[0]) if dim == 2 else None  # 2D images: no slice axis
    return perm, slice_axis


def _labels(dataset_json: dict[str, Any], path: Path) -> dict[str, int]:
    """Label name -> value without nnU-Net's ``ignore`` label (never predicted); regions refused."""
    raw = dataset_json.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise MedalloyError("dataset.json has no 'labels'", path, "use the dataset.json nnU-Net wrote beside plans.json")
    if "regions_class_order" in dataset_json or any(not isinstance(v, int) for v in raw.values()):
        raise MedalloyError(
            "region-based nnU-Net model (labels as lists, regions_class_order)",
            path,
            "import a model trained with one integer per label: medalloy predicts one label per voxel",
        )
    return {k: v for k, v in raw.items() if k != "ignore"}


def _normalization(plans: dict[str, Any], cfg: dict[str, Any], channels: int, path: Path) -> list[ChannelNorm]:
    """nnU-Net's per-channel schemes as medalloy's (the same arithmetic, see ``ChannelNorm``)."""
    schemes = list(cfg.get("normalization_schemes", []))
    masked = list(cfg.get("use_mask_for_norm", [False] * len(schemes)))
    if len(schemes) != channels:
        raise MedalloyError(f"{len(schemes)} normalization_schemes for {channels} channels in dataset.json", path, "use the plans.json of this dataset")
    stats = plans.get("foreground_intensity_properties_per_channel", {})
    norms = []
    for c, scheme in enumerate(schemes):
        short = str(scheme).rsplit(".", 1)[-1]
        if short not in _NORMS:
            raise MedalloyError(f"normalisation {scheme} of channel {c} is not supported", path, f"supported: {', '.join(_NORMS)}")
        if c < len(masked) and masked[c]:
            # nnU-Net then z-scores inside the non-zero mask only and zeroes the rest: medalloy has no such mask.
            raise MedalloyError(
                f"channel {c} uses a masked z-score (use_mask_for_norm)",
                path,
                "medalloy's preprocessing does not reproduce it; import a model planned without it",
            )
        if short == "CTNormalization":
            s = stats.get(str(c), {})
            if not all(k in s for k in ("mean", "std", "percentile_00_5", "percentile_99_5")):
                raise MedalloyError(f"CT normalisation of channel {c} without foreground intensity statistics", path, "use the plans.json nnU-Net wrote")
            norms.append(ChannelNorm(scheme="ct", clip_low=s["percentile_00_5"], clip_high=s["percentile_99_5"], mean=s["mean"], std=s["std"]))
        else:
            norms.append(ChannelNorm(scheme=_NORMS[short]))
    return norms


def _plan(plans: dict, cfg: dict, dataset_json: dict, cfg_name: str, path: Path, ds_path: Path) -> tuple[Plan, list[int]]:
    arch = cfg["architecture"].get("arch_kwargs", {})
    dim = len(cfg["patch_size"])
    perm, slice_axis = _axes(plans, dataset_json, dim, path)

    def ours(per_axis: Any) -> list:  # nnU-Net's per-axis list, in medalloy's axis order
        return [per_axis[a] for a in perm] if isinstance(per_axis, (list, tuple)) else [per_axis] * dim

    labels = _labels(dataset_json, ds_path)
    n_stages = int(arch.get("n_stages", 0))
    norm_cls = str(arch.get("norm_op") or "").rsplit(".", 1)[-1]
    norm = next((v for k, v in (("Instance", "instance"), ("Batch", "batch"), ("Group", "group")) if norm_cls.startswith(k)), "none")
    try:
        plan = Plan(
            dataset=str(dataset_json.get("name") or plans.get("dataset_name") or path.parent.parent.name),
            dim=dim,
            slice_axis=slice_axis,
            in_channels=len(dataset_json.get("channel_names", {})),
            target_spacing=ours([float(s) for s in cfg["spacing"][-dim:]]),
            patch_size=ours([int(s) for s in cfg["patch_size"]]),
            batch_size=int(cfg.get("batch_size", 2)),
            normalization=_normalization(plans, cfg, len(dataset_json.get("channel_names", {})), path),
            label_values=sorted(labels.values()),
            labels=labels,
            network=NetworkPlan(
                architecture="nnUNet",
                kernels=[ours(k) for k in _per_stage(arch.get("kernel_sizes"), n_stages)],
                strides=[ours(s) for s in _per_stage(arch.get("strides"), n_stages)],
                filters=[int(f) for f in _per_stage(arch.get("features_per_stage"), n_stages)],
                norm=norm,
                res_block=cfg["architecture"].get("network_class_name", "").endswith("ResidualEncoderUNet"),
            ),
            median_shape=[int(round(s)) for s in ours(cfg.get("median_image_size_in_voxels", [0] * dim))],
            notes=[
                f"imported from nnU-Net v2 ({plans.get('plans_name', 'plans')}, configuration {cfg_name})",
                "differs from nnUNetv2_predict: no crop to the non-zero region, linear resampling, all axes mirrored with --tta",
            ],
        )
    except (ValidationError, KeyError, TypeError, ValueError) as exc:
        why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else f"{exc.__class__.__name__}: {exc}"
        raise MedalloyError(
            f"configuration {cfg_name!r} does not describe a U-Net medalloy can run ({why})", path, "use the plans.json nnU-Net wrote"
        ) from None
    return plan, perm


def _per_stage(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


# -- network -------------------------------------------------------------------------------------
def _layer(name: str, path: Path) -> Any:
    """A dotted layer name of plans.json as the class, from the allow-list only."""
    module, _, cls = name.rpartition(".")
    if module in _TORCH_PATHS and cls in _TORCH_LAYERS:
        return getattr(torch.nn, cls)
    if name in _DNA_BLOCKS:
        return getattr(importlib.import_module("dynamic_network_architectures.building_blocks.residual"), _DNA_BLOCKS[name])
    raise MedalloyError(
        f"layer {name!r} is not on medalloy's list of torch.nn layers",
        path,
        "use the plans.json nnU-Net wrote (torch.nn convolutions, norms, dropout, activations)",
    )


def _network(cfg: dict[str, Any], plan: Plan, perm: list[int], path: Path) -> tuple[nn.Module, dict[str, int]]:
    """nnU-Net's network for ``plan`` (axes permuted as the plan's) and its stage channels."""
    arch = cfg["architecture"]
    cls_name = str(arch.get("network_class_name", ""))
    module, _, short = cls_name.rpartition(".")
    if module not in ("", _UNET_MODULE) or short not in _NETWORKS:
        raise MedalloyError(f"network {cls_name!r} is not supported", path, f"import models of {' or '.join(_NETWORKS)} ({_UNET_MODULE})")
    try:
        unet = importlib.import_module(_UNET_MODULE)
    except ImportError:
        raise MedalloyError("dynamic_network_architectures (nnU-Net's networks) is not installed", path, INSTALL) from None
    kwargs = dict(arch.get("arch_kwargs", {}))
    for key in arch.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _layer(str(kwargs[key]), path)
    kwargs["kernel_sizes"], kwargs["strides"] = plan.network.kernels, plan.network.strides  # medalloy's axis order (``perm``)
    kwargs["deep_supervision"] = False
    try:
        net = getattr(unet, short)(input_channels=plan.in_channels, num_classes=plan.num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        why = f"{exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
        raise MedalloyError(f"cannot build {short} from plans.json ({why})", path, "use the plans.json nnU-Net wrote with this model") from None
    filters = plan.network.filters
    n = len(filters)
    channels = {f"enc{i}": filters[i] for i in range(n - 1)} | {"bottleneck": filters[-1]} | {f"dec{j}": filters[j] for j in range(n - 2, -1, -1)}
    return net, channels


def _stages(n: int) -> dict[str, str]:
    """``enc0`` ... ``enc{n-2}`` (encoder stages), ``bottleneck`` (the last encoder stage), then
    ``dec{n-2}`` ... ``dec0``: ``decoder.stages.0`` is the coarsest."""
    stages = {f"enc{i}": f"encoder.stages.{i}" for i in range(n - 1)}
    stages["bottleneck"] = f"encoder.stages.{n - 1}"
    for s in range(n - 1):
        stages[f"dec{n - 2 - s}"] = f"decoder.stages.{s}"
    return stages


def _modality(dataset_json: dict[str, Any]) -> str:
    ext = dataset_json.get("medalloy") if isinstance(dataset_json.get("medalloy"), dict) else {}
    return str(ext.get("modality") or next(iter(dataset_json.get("channel_names", {}).values()), "unknown"))
