"""Method name -> how to load its checkpoint for prediction and export; and every other kind of model source.

Each recipe module ends with one ``register(METHOD, loader)`` line. A checkpoint's record names its
``method``; :func:`loader_for` imports the recipe modules on first use, so ``predict`` needs no list
of methods and a new recipe needs no change outside its own file.

Pretraining's image-text models predict no masks: their recipe registers with
``register_image_text(METHOD, loader)`` instead, which ``zeroshot``, ``caption``, ``probe`` and
``retrieve`` load through (:func:`load_image_text_model`), and which makes ``predict`` (and any
other mask-predicting use) say in one line what such a run is for.

:func:`load_model` is the one way in for prediction, export and frozen experts: a source is a run
folder or ``.safetensors`` checkpoint (the loader of its record's method), an exported ``.onnx``
graph with its sidecar, or a trained nnU-Net v2 model folder or ``.pth`` checkpoint; the last two
are source kinds registered below (``register_source``), tried before the medalloy checkpoint.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from medalloy.engine.checkpoint import read_record
from medalloy.errors import MedalloyError
from medalloy.planning.plan import Plan
from medalloy.runs import resolve_checkpoint

# (checkpoint path, device, dataset name or None) -> (network taking (B, C, *sp), plan, record)
Loader = Callable[[Path, str, "str | None"], "tuple[nn.Module, Plan, dict[str, Any]]"]

# (checkpoint path, tasks, dataset or None, modality or None, device) -> (network with one sigmoid
# map per task, plan whose classes are the tasks, record, one-line note of the preprocessing used)
TaskLoader = Callable[..., "tuple[nn.Module, Plan, dict[str, Any], str]"]

# (checkpoint path, device) -> (image-text model, text-encoder tokenizer, report tokenizer, record)
ImageTextLoader = Callable[[Path, str], "tuple[nn.Module, Any, Any, dict[str, Any]]"]

_LOADERS: dict[str, Loader] = {}
_TASK_LOADERS: dict[str, TaskLoader] = {}
_IMAGE_TEXT: dict[str, ImageTextLoader] = {}


def register(method: str, loader: Loader, tasks: TaskLoader | None = None) -> None:
    """Make checkpoints whose record says ``method`` loadable (``tasks``: also per task, for models
    with one sigmoid output per task); a second loader for one name is an error."""
    if method in _LOADERS and _LOADERS[method] is not loader:
        raise ValueError(f"a loader for method '{method}' is registered already")
    _LOADERS[method] = loader
    if tasks is not None:
        _TASK_LOADERS[method] = tasks


def register_image_text(method: str, loader: ImageTextLoader) -> None:
    """Make checkpoints whose record says ``method`` loadable as image-text models (no masks)."""
    if _IMAGE_TEXT.get(method, loader) is not loader:
        raise ValueError(f"an image-text loader for method '{method}' is registered already")
    _IMAGE_TEXT[method] = loader


def _import_recipes() -> None:
    import medalloy.recipes as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("registry", "scaffold", "config", "multitask"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def registered() -> list[str]:
    _import_recipes()
    return sorted(_LOADERS)


def loader_for(method: Any, checkpoint: str | Path) -> Loader:
    if method not in _LOADERS:
        _import_recipes()
    if method in _IMAGE_TEXT:
        fix = "use it with zeroshot, caption, probe or retrieve, or start an expert from it (train expert --init)"
        raise MedalloyError(f"a '{method}' model predicts no masks", checkpoint, fix)
    if method not in _LOADERS:
        raise MedalloyError(f"cannot predict with a '{method}' checkpoint", checkpoint, f"use a run of one of: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[method]


def task_loader_for(method: Any, checkpoint: str | Path) -> TaskLoader:
    loader_for(method, checkpoint)
    if method not in _TASK_LOADERS:
        raise MedalloyError(f"a '{method}' model has no per-task outputs", checkpoint, "predict label maps without --task")
    return _TASK_LOADERS[method]


def load_checkpoint_model(checkpoint: str | Path, device: str = "cpu", dataset: str | None = None) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Model, plan and record of any method's checkpoint, by the ``method`` its record names."""
    return loader_for(read_record(checkpoint).get("method"), checkpoint)(Path(checkpoint), device, dataset)


def load_checkpoint_tasks(
    checkpoint: str | Path, tasks: list[str], dataset: str | None = None, modality: str | None = None, device: str = "cpu", geometry: Any = None
) -> tuple[nn.Module, Plan, dict[str, Any], str]:
    """A per-task model (one sigmoid map per task of ``tasks``) from any method that has one;
    ``geometry`` (:class:`~medalloy.planning.input_fit.InputGeometry` of the images to predict)
    chooses the preprocessing when ``dataset`` does not."""
    loader = task_loader_for(read_record(checkpoint).get("method"), checkpoint)
    return loader(Path(checkpoint), tasks, dataset=dataset, modality=modality, device=device, geometry=geometry)


def load_image_text_model(source: str | Path, device: str = "cpu") -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """Model, text-encoder tokenizer, report tokenizer and record of an image-text run (its
    ``checkpoints/best.safetensors``) or checkpoint, by the ``method`` its record names."""
    from medalloy.recipes.init_weights import checkpoint_of

    file = checkpoint_of(source)
    method = read_record(file).get("method")
    if method not in _IMAGE_TEXT:
        _import_recipes()
    if method not in _IMAGE_TEXT:
        wanted = " or ".join(f"'{m}'" for m in sorted(_IMAGE_TEXT))
        raise MedalloyError(f"checkpoint is for method '{method}', not {wanted}", file, f"give a run of {wanted} (an image-text model)")
    return _IMAGE_TEXT[method](file, device)


# -- sources: what load_model accepts --------------------------------------------------------------
MEDALLOY, ONNX, NNUNET = "medalloy", "onnx", "nnunet"


@dataclass(frozen=True)
class SourceKind:
    """One kind of model source besides medalloy's checkpoints: how it is recognised (``matches``),
    which file a ``which`` (``best``/``last``; None: the kind's own default) names (``resolve``),
    and how that file loads (``load``, a :data:`Loader`). ``no_tasks``: the one-line reason it has
    no per-task outputs, and its fix."""

    name: str
    matches: Callable[[Path], bool]
    resolve: Callable[[Path, str | None], Path]
    load: Loader
    no_tasks: tuple[str, str]


@dataclass(frozen=True)
class Source:
    """A resolved model source: its kind (``medalloy``, ``onnx``, ``nnunet``, ...) and the file to load."""

    kind: str
    path: Path


_SOURCES: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> None:
    """Make ``load_model`` accept sources of ``kind`` (tried in registration order, before medalloy's checkpoints)."""
    if kind.name == MEDALLOY or _SOURCES.get(kind.name, kind) is not kind:
        raise ValueError(f"a source kind '{kind.name}' is registered already")
    _SOURCES[kind.name] = kind


def resolve_source(source: str | Path, which: str | None = "best") -> Source:
    """The kind of ``source`` and the file ``which`` names in it: a registered kind that matches,
    else a medalloy run folder (``checkpoints/<which>.safetensors``) or checkpoint file.
    Resolving a resolved path gives it back."""
    path = Path(source)
    for kind in _SOURCES.values():
        if kind.matches(path):
            return Source(kind.name, kind.resolve(path, which))
    return Source(MEDALLOY, resolve_checkpoint(path, which or "best"))


def load_model(source: str | Path, device: str = "cpu", dataset: str | None = None, which: str | None = "best") -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Network ``(B, C, *patch) -> (B, K, *patch)`` logits, plan and record of any model source
    (:func:`resolve_source`; ``which``: ``best`` or ``last``, None: each kind's default, nnU-Net's
    being its ``checkpoint_final.pth``). ``dataset`` names which of a multi-dataset model's
    datasets (tasks, modality, preprocessing) the images belong to; an ONNX graph was bound to its
    tasks at export and an nnU-Net model has one dataset, so it does not apply to them."""
    src = resolve_source(source, which)
    if src.kind in _SOURCES:
        return _SOURCES[src.kind].load(src.path, device, dataset)
    return load_checkpoint_model(src.path, device, dataset)


def load_task_model(
    source: str | Path,
    tasks: list[str],
    dataset: str | None = None,
    modality: str | None = None,
    device: str = "cpu",
    which: str = "best",
    geometry: Any = None,
) -> tuple[nn.Module, Plan, dict[str, Any], str]:
    """:func:`load_checkpoint_tasks` of a run folder or checkpoint; other kinds of source are refused in one line."""
    src = resolve_source(source, which)
    if src.kind in _SOURCES:
        raise MedalloyError(_SOURCES[src.kind].no_tasks[0], src.path, _SOURCES[src.kind].no_tasks[1])
    return load_checkpoint_tasks(src.path, tasks, dataset=dataset, modality=modality, device=device, geometry=geometry)


def _load_onnx(path: Path, device: str, dataset: str | None) -> tuple[nn.Module, Plan, dict[str, Any]]:
    from medalloy.interop.onnx_runtime import load_onnx

    return load_onnx(path)  # runs on ONNX Runtime's CPU provider; the Predictor moves its input there


def _is_nnunet(path: Path) -> bool:
    from medalloy.interop.nnunet import is_nnunet_folder

    return path.suffix == ".pth" or is_nnunet_folder(path)


def _nnunet_file(path: Path, which: str | None) -> Path:
    from medalloy.interop.nnunet import nnunet_checkpoint

    return path if path.suffix == ".pth" else nnunet_checkpoint(path, which or "last")


def _load_nnunet(path: Path, device: str, dataset: str | None) -> tuple[nn.Module, Plan, dict[str, Any]]:
    from medalloy.interop.nnunet import load_nnunet_expert

    return load_nnunet_expert(path, device)


register_source(
    SourceKind(
        ONNX, lambda p: p.suffix == ".onnx", lambda p, which: p, _load_onnx,
        ("an ONNX graph predicts the tasks it was exported for, not --task", "predict without --task, or export the run with --task for other tasks"),
    )
)  # fmt: skip
register_source(SourceKind(NNUNET, _is_nnunet, _nnunet_file, _load_nnunet, ("an nnU-Net model has no per-task outputs", "predict label maps without --task")))
