"""Per-stage features of any network, read the same way for every backbone.

Each backbone factory registers which submodule ends each stage (``model.medalloy_stages``, a
``{stage name: module path}`` dict). :class:`FeatureTap` hooks those modules for one forward pass,
so methods that need features (amalgamation, relation distillation) never re-implement a network::

    with FeatureTap(model, ["enc2", "bottleneck"]) as tap:
        logits = model(x)
    tap.features["bottleneck"]  # (B, C, *spatial)
"""

from __future__ import annotations

from torch import nn

from medalloy.errors import MedalloyError

STAGES_ATTR = "medalloy_stages"


def stage_names(model: nn.Module) -> list[str]:
    """Stage names a model exposes, from input resolution to output resolution."""
    model = getattr(model, "module", model)  # DDP
    stages = getattr(model, STAGES_ATTR, None)
    if not stages:
        raise MedalloyError(f"{type(model).__name__} exposes no stages", fix="build it with a medalloy model factory")
    return list(stages)


class FeatureTap:
    """Context manager collecting the outputs of named stages during forward passes."""

    def __init__(self, model: nn.Module, stages: list[str] | None = None, detach: bool = False):
        self.model = getattr(model, "module", model)
        available = getattr(self.model, STAGES_ATTR, {})
        self.stages = list(available) if stages is None else list(stages)
        unknown = [s for s in self.stages if s not in available]
        if unknown:
            raise MedalloyError(f"unknown stages {unknown}", fix=f"choose from {list(available)}")
        self.detach = detach
        self.features: dict = {}
        self._handles: list = []
        self._paths = {s: available[s] for s in self.stages}

    def __enter__(self) -> FeatureTap:
        modules = dict(self.model.named_modules())
        for stage, path in self._paths.items():
            self._handles.append(modules[path].register_forward_hook(self._hook(stage)))
        return self

    def _hook(self, stage: str):
        def fn(_module, _inp, out):
            if isinstance(out, tuple):  # e.g. a fusion layer: (features, tokens, ...)
                out = out[0]
            self.features[stage] = out.detach() if self.detach else out

        return fn

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
