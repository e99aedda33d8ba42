"""The pipeline file: datasets and stages, one pydantic model (unknown keys refused, JSON schema).

A stage's settings are the fields of its recipe's config (what ``medalloy train <method>
--config`` reads: ``train: {steps: ...}``, ``fold``, ``augment`` ...) beside the few keys that
connect it to the others (``datasets``, ``init``, ``experts``, ``teacher``, ``from``) and its
budget (``share`` of the pipeline's ``budget``, or its own ``budget``)::

    name: chest
    budget: 60m
    datasets:
      JSRT: {path: ${DATA}/Dataset102_JSRT}
    stages:
      experts: {share: 0.5}
      universal: {share: 0.5, patch_size: 96}
      evaluate: {}
      report: {}

A stage's kind is its name (``experts``) or its ``kind`` (``experts_pretrained: {kind: experts,
init: pretrain}``), so one kind may appear twice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medalloy.errors import MedalloyError
from medalloy.recipes.amalgamate import AmalgamateConfig
from medalloy.recipes.config import first_error
from medalloy.recipes.distill import DistillConfig
from medalloy.recipes.expert import ExpertConfig
from medalloy.recipes.pretrain import PretrainConfig
from medalloy.recipes.universal import UniversalConfig

# the stages in the order they run when nothing else decides (a stage runs after what it names)
KINDS = ("pretrain", "experts", "universal", "amalgamate", "distill", "export", "evaluate", "report")
# the kinds that train, and their share of the pipeline's budget when none is given
DEFAULT_SHARES = {"pretrain": 0.10, "experts": 0.35, "universal": 0.25, "amalgamate": 0.15, "distill": 0.15, "evaluate": 0.20}
_STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RESERVED = ("data", "stages")  # RUN/data holds the built datasets
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$")


def budget_minutes(value: str | float | int | None) -> float | None:
    """``90m``, ``1.5h``, ``45s`` or a number of minutes."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        minutes = float(value)
    else:
        m = _BUDGET.match(str(value))
        if not m:
            raise ValueError(f"budget '{value}' is not a duration: write 90m, 1.5h or 45s")
        unit = (m.group(2) or "m")[0]
        minutes = float(m.group(1)) * {"s": 1 / 60, "m": 1.0, "h": 60.0}[unit]
    if minutes <= 0:
        raise ValueError(f"budget '{value}' must be positive")
    return minutes


Budget = Annotated[str | float | None, Field(description="a duration: 90m, 1.5h, 45s or minutes as a number")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FolderImport(_Strict):
    """One source's images/ and masks/ folders (same file stems), imported as an nnU-Net raw dataset."""

    images: Path
    masks: Path
    source: str = Field(description="the centre or collection the images come from (leave-one-source-out rows use it)")


class SyntheticData(_Strict):
    """One of the built-in synthetic datasets (``medalloy data synth``)."""

    name: str = Field(description="SynthCXR, SynthCXRLung, SynthMR, SynthEndo (or a folder name or id)")
    cases_per_source: int = Field(10, ge=1)
    test_cases_per_source: int = Field(3, ge=0)
    seed: int = Field(0, ge=0, description="the images' seed (the same seed, the same dataset)")


class DatasetEntry(_Strict):
    """A dataset: an nnU-Net v2 raw folder (``path``), image/mask folders to import, or a synthetic one."""

    path: Path | None = Field(None, description="an nnU-Net v2 raw dataset folder (dataset.json, imagesTr, labelsTr)")
    import_: list[FolderImport] | None = Field(None, alias="import", description="image/mask folders, one source each, imported once into RUN/data")
    labels: dict[str, int] | None = Field(None, description="for import: label name -> mask value (background 0 is added)")
    modality: str | None = Field(None, description="for import: CT, MR, xray, endoscopy ...")
    synthetic: SyntheticData | None = None
    held_out: float | None = Field(
        None, gt=0, lt=1, description="without labelsTs: the share of cases (by patient) held out for evaluation (default: the pipeline's)"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> DatasetEntry:
        given = [k for k in ("path", "import_", "synthetic") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of path, import, synthetic")
        if (self.labels is not None or self.modality is not None) and self.import_ is None:
            raise ValueError("labels and modality are for import (an nnU-Net folder has them in its dataset.json)")
        return self


class StageBase(_Strict):
    """What every stage has beside its own settings."""

    kind: str
    share: float | None = Field(None, gt=0, description="share of the pipeline's budget (training stages)")
    budget: Budget = None


class _Training(StageBase):
    datasets: list[str] | None = Field(None, description="the pipeline's datasets this stage trains on (default: all)")


class ExpertsStage(_Training, ExpertConfig):
    """One expert per dataset (``medalloy train expert``); a budget is split evenly over them."""

    kind: Literal["experts"] = "experts"
    init: str | None = Field(None, description="a pretrain stage's name (its encoder starts each expert), or a pretrain/expert run folder")


class UniversalStage(_Training, UniversalConfig):
    """One Hermes model for every dataset's tasks (``medalloy train universal``)."""

    kind: Literal["universal"] = "universal"


class AmalgamateStage(_Training, AmalgamateConfig):
    """Frozen experts amalgamated into one SwinUNETR model (``medalloy train amalgamate``)."""

    kind: Literal["amalgamate"] = "amalgamate"
    experts: list[str] = Field(
        default_factory=lambda: ["experts"], min_length=1, description="experts stages by name, and/or nnU-Net v2 result folders or medalloy runs"
    )


class DistillStage(_Training, DistillConfig):
    """A small student of a teacher stage (``medalloy train distill``): one per dataset of an experts teacher."""

    kind: Literal["distill"] = "distill"
    teacher: str = Field(description="the stage whose model teaches (experts: each dataset's own expert), or a run folder")


class PretrainPairs(_Strict):
    """Synthetic radiographs with reports (the demo's), training and held-out."""

    cases: int = Field(160, ge=1)
    test_cases: int = Field(40, ge=0)
    text_only: int = Field(200, ge=0, description="reports without images, for the summarization stage")


class PretrainStage(StageBase, PretrainConfig):
    """HybridMED image-report pretraining (``medalloy train pretrain``); experts may start from its encoder."""

    kind: Literal["pretrain"] = "pretrain"
    pairs: Path | PretrainPairs = Field(description="an image-report CSV, or synthetic pairs")
    text_only: Path | None = Field(None, description="a findings -> impression CSV for stage 1")
    test_pairs: Path | None = Field(None, description="held-out image-report pairs: zero-shot accuracy and captions")


class ExportStage(StageBase):
    """ONNX graphs (and JSON sidecars) of a stage's models."""

    kind: Literal["export"] = "export"
    from_: str = Field("distill", alias="from", description="the stage whose models are exported")
    quantize: Literal["int8"] | None = None
    opset: int = Field(18, ge=17)


class EvaluateStage(StageBase):
    """Every model scored on each dataset's held-out cases (``labelsTs``), per task and per source."""

    kind: Literal["evaluate"] = "evaluate"
    models: list[str] | None = Field(None, description="the stages whose models are scored (default: every model stage)")
    latency_runs: int = Field(20, ge=1, description="batch-1 forward passes timed per model (median)")
    overlays: bool = True
    leave_one_source_out: bool = Field(
        False,
        description="also score each model stage on every source with its models rebuilt without that source (training cases only; its own budget share)",
    )


class ReportStage(StageBase):
    """``RUN/report.md`` and ``RUN/report.json``: tables, curves, overlays, the recommendation."""

    kind: Literal["report"] = "report"
    tolerance: float = Field(0.03, ge=0, le=1, description="the recommendation: the smallest model within this Dice of the best")


Stage = Annotated[
    PretrainStage | ExpertsStage | UniversalStage | AmalgamateStage | DistillStage | ExportStage | EvaluateStage | ReportStage,
    Field(discriminator="kind"),
]
MODEL_KINDS = ("experts", "universal", "amalgamate", "distill", "export")


class PipelineConfig(_Strict):
    """A pipeline: its datasets and its stages (any may be left out)."""

    name: str = "pipeline"
    seed: int = Field(0, description="every stage's train.seed unless the stage gives its own")
    device: str = Field("auto", description="every stage's train.device unless the stage gives its own")
    jobs: int = Field(1, ge=1, description="experts of several datasets trained in parallel processes, one torch thread each")
    budget: Budget = Field(None, description="the whole run's training time, split over the training stages by their share")
    held_out: float = Field(
        0.2, gt=0, lt=1, description="a dataset without labelsTs: the share of its cases (by patient) no stage trains or selects on, for evaluate"
    )
    datasets: dict[str, DatasetEntry] = Field(min_length=1)
    stages: dict[str, Stage] = Field(min_length=1)

    @field_validator("stages", mode="before")
    @classmethod
    def _kind_from_name(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for name, stage in value.items():
            if not _STAGE_NAME.match(str(name)) or name in RESERVED:
                raise ValueError(f"stage name '{name}': use letters, digits, _ and - (not {', '.join(RESERVED)}): it names the stage's folder")
            stage = {} if stage is None else stage
            if isinstance(stage, dict) and "kind" not in stage:
                if name not in KINDS:
                    raise ValueError(f"stage '{name}' needs a kind (one of {', '.join(KINDS)}): `{name}: {{kind: experts, ...}}`")
                stage = {**stage, "kind": name}
            kind = stage.get("kind") if isinstance(stage, dict) else None
            if kind in RECIPE_CONFIGS and isinstance(stage.get("train", {}), dict):
                # a partial train section keeps the method's defaults (as `--config` does); seed and
                # device stay unset unless given, so the pipeline's own fill them
                defaults = RECIPE_CONFIGS[kind]().train.model_dump(exclude={"seed", "device"})  # type: ignore[attr-defined]
                stage = {**stage, "train": {**defaults, **(stage.get("train") or {})}}
            out[name] = stage
        return out

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        budget_minutes(value)
        return value


def json_schema() -> dict[str, Any]:
    """The pipeline file's JSON schema (published in the docs; editors validate with it)."""
    return PipelineConfig.model_json_schema(by_alias=True)


def _expand(value: Any, variables: dict[str, str], path: Path) -> Any:
    if isinstance(value, str):

        def one(m: re.Match) -> str:
            name = m.group(1)
            if name not in variables:
                raise MedalloyError(f"${{{name}}} is not set", path, f"export {name}=... or pass --var {name}=...")
            given = variables[name]
            # a relative path typed on the command line means from where it was typed, not from the YAML's folder
            if m.start() == 0 and not os.path.isabs(given) and os.path.exists(given):
                return str(Path(given).resolve())
            return given

        return _VAR.sub(one, value)
    if isinstance(value, dict):
        return {k: _expand(v, variables, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, variables, path) for v in value]
    return value


def load_pipeline(source: str | Path | dict | PipelineConfig, variables: dict[str, str] | None = None) -> PipelineConfig:
    """A pipeline from its YAML file (``${VAR}`` from ``variables``, then the environment; relative
    paths from the file's folder, except a value that starts with a variable holding a relative path
    that exists from the current folder: from there), a dict or a config itself."""
    if isinstance(source, PipelineConfig):
        return source
    where = Path("<dict>")
    raw: Any = source
    if not isinstance(source, dict):
        where = Path(source)
        if not where.is_file():
            raise MedalloyError("pipeline file not found", where, "give the path of a pipeline YAML (examples/demo.yaml)")
        try:
            raw = yaml.safe_load(where.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise MedalloyError(f"not valid YAML: {str(exc).splitlines()[0]}", where, "fix the YAML syntax") from None
        if not isinstance(raw, dict):
            raise MedalloyError("a pipeline file is a mapping (name, datasets, stages)", where, "see examples/demo.yaml")
    raw = _expand(raw, {**os.environ, **(variables or {})}, where)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise MedalloyError(f"invalid pipeline: {first_error(exc)}", where, "fix that key (`medalloy pipeline --schema` lists every field)") from None
    if where.name != "<dict>":
        cfg = _relative_to(cfg, where.parent)
    return cfg


def _relative_to(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    """Relative dataset and pair paths are the YAML file's neighbours."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    for entry in cfg.datasets.values():
        entry.path = fix(entry.path)
        for imp in entry.import_ or []:
            imp.images, imp.masks = fix(imp.images), fix(imp.masks)  # type: ignore[assignment]
    for stage in cfg.stages.values():
        if isinstance(stage, PretrainStage):
            if isinstance(stage.pairs, Path):
                stage.pairs = fix(stage.pairs)  # type: ignore[assignment]
            stage.text_only, stage.test_pairs = fix(stage.text_only), fix(stage.test_pairs)
    return cfg


RECIPE_CONFIGS: dict[str, type[BaseModel]] = {
    "experts": ExpertConfig,
    "universal": UniversalConfig,
    "amalgamate": AmalgamateConfig,
    "distill": DistillConfig,
    "pretrain": PretrainConfig,
}


def recipe_config(stage: StageBase, seed: int, device: str, budget: float | None) -> BaseModel:
    """The recipe's own config of a training stage: its fields, the pipeline's seed and device where
    the stage gives none, the stage's budget as the run's time budget."""
    cls = RECIPE_CONFIGS[stage.kind]
    cfg = cls.model_validate({k: getattr(stage, k) for k in cls.model_fields})
    given = stage.train.model_fields_set  # type: ignore[attr-defined]
    update: dict[str, Any] = {}
    if "seed" not in given:
        update["seed"] = seed
    if "device" not in given:
        update["device"] = device
    if budget is not None:
        update["time_budget_minutes"] = budget
    cfg.train = cfg.train.model_copy(update=update)  # type: ignore[attr-defined]
    return cfg
