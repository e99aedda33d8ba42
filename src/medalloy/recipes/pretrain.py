"""Image-report pretraining (HybridMED, Jiang et al. arXiv 2410.00448; design in
docs/methods/pretraining.md): ``medalloy train pretrain --pairs CSV [--text-only CSV] --out RUN``.

Two stages, both through the shared engine:

1. *summarization* (``RUN/summarize/``): the text encoder and the decoder's summarization branch
   learn findings -> impression on every report (the text-only table and the pairs' text);
2. *joint* (``RUN/``): L = w_global L_global + w_token L_token + w_summary L_sum + w_caption L_cap
   + w_distill L_dis (``weights`` in the config: global_alignment, token_alignment, summary, caption,
   distill; losses/hybridmed_objective.py), with a frozen copy of the stage-1 model as the
   summarization teacher of the captioning branch. ``losses`` picks the arms: ``[global]``
   (ConVIRT/CLIP style), ``[global, token]`` (GLoRIA/MGCA style) or all three groups (HybridMED;
   only it runs stage 1).

Batches come from data/report_batches.py, the network from :func:`build_pretrained` of the run's
:class:`PretrainSpec` (for training and loading alike).

Run folder::

    RUN/run.json  plan.json  config.yaml  split.json (dataset "pairs": row numbers; val_patients)  tokenizer.json
    RUN/summarize/{metrics.jsonl, training_curve.png, checkpoints/}
    RUN/metrics.jsonl  training_curve.png  checkpoints/{best,last}.safetensors (+ .json)

The checkpoint's record holds the spec, the plan and the tokenizer, so ``zeroshot``, ``caption``,
``probe``, ``retrieve`` (which load it through the registry's image-text loaders) and
``train expert --init RUN`` need nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from medalloy.data.report_batches import PairBatches, TextSet, cache_images, encode_impressions, encode_reports
from medalloy.data.reports import ReportColumns, ReportPair, read_report_pairs, read_text_pairs, split_by_patient
from medalloy.data.tokenizer import TextTokenizer, minilm_tokenizer, train_report_tokenizer
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.metrics import retrieval_recall
from medalloy.engine.trainer import TrainConfig, TrainSpec, to_device
from medalloy.errors import MedalloyError
from medalloy.losses.global_contrastive import GlobalContrastiveLoss
from medalloy.losses.hybridmed_objective import HybridMEDObjective, mean_terms
from medalloy.models.hybridmed import HybridMED
from medalloy.models.text_encoder import MiniLMTextEncoder, ScratchTextEncoder, minilm_dir
from medalloy.models.unet import count_parameters
from medalloy.planning.plan import NetworkPlan, Plan, save_plan
from medalloy.recipes.registry import register_image_text
from medalloy.recipes.scaffold import Recipe, Run, given_or_kept_plan, kept_split, resolve_config, run_recipe, split_record
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.seeding import seed_everything

METHOD = "pretrain"
STAGE1 = "summarize"
LossGroup = Literal["global", "token", "generation"]


class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    global_alignment: float = Field(1.0, ge=0)
    token_alignment: float = Field(1.0, ge=0)
    summary: float = Field(1.0, ge=0)
    caption: float = Field(1.0, ge=0)
    distill: float = Field(1.0, ge=0)


class PretrainConfig(BaseModel):
    """Everything of a pretraining run (YAML: ``--config CFG.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=2000, val_every=200, lr=5e-4, weight_decay=0.01, grad_clip=1.0, schedule="cosine", warmup_steps=50)
    )
    columns: ReportColumns = Field(default_factory=ReportColumns)
    text_only_findings: str = "findings"
    text_only_impression: str = "impression"
    skip_empty: bool = False
    losses: list[LossGroup] = Field(
        default_factory=lambda: ["global", "token", "generation"], min_length=1,
        description="HybridMED's objectives: image-report contrast of whole images and of tokens, report generation",
    )  # fmt: skip
    weights: LossWeights = Field(default_factory=LossWeights)
    summarize_steps: int = Field(500, ge=1, description="steps of stage 1 (summarization)")
    # share of the run's wall-clock budget (train.time_budget_minutes) given to stage 1; stage 2 gets the rest
    summarize_budget_fraction: float = Field(0.2, gt=0, lt=1)
    image_size: int = Field(224, ge=16, description="square network input")
    text_encoder: Literal["auto", "scratch", "minilm"] = Field("auto", description="minilm needs medalloy[text]; auto: minilm when installed")
    minilm_trainable_layers: int = Field(2, ge=0, le=6)
    batch_size: int = Field(16, ge=2, description="image-report pairs per step")
    width: int = Field(256, ge=16)
    embed_dim: int = Field(128, ge=8)
    text_layers: int = Field(4, ge=1)
    decoder_layers: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)
    token_stages: int = Field(2, ge=1)
    token_scope: Literal["batch", "pair"] = Field(
        "batch", description="token-level contrast over every image-report pair of the batch (GLoRIA), or within each matched pair (MGCA; B times cheaper)"
    )
    vocab_size: int = Field(4000, ge=16)
    max_findings_len: int = Field(128, ge=8)
    max_impression_len: int = Field(32, ge=4)
    distill_temperature: float = Field(2.0, gt=0)
    val_fraction: float = Field(0.15, ge=0, lt=1, description="share of the patients held out for validation")
    augment: bool = True


class PretrainSpec(ModelSpec):
    """A :class:`~medalloy.models.hybridmed.HybridMED`: a DynUNet encoder of ``network`` for grey
    radiographs, a ``text_encoder`` (scratch: of ``vocab_size``, ``width``, ``text_layers``; MiniLM:
    ``minilm_trainable_layers`` of it trained), and the report decoder (fields as in :class:`PretrainConfig`).
    ``out_channels``: the classes of the U-Net the encoder is cut from (the plan's); no output has them,
    but they decide which initial weights a seed draws (:class:`~medalloy.models.image_encoder.UNetEncoder`)."""

    METHOD: ClassVar[str] = METHOD

    network: NetworkPlan
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(1, ge=1)
    text_encoder: Literal["scratch", "minilm"]
    vocab_size: int
    width: int
    embed_dim: int
    text_layers: int
    decoder_layers: int
    heads: int
    token_stages: int
    max_findings_len: int
    max_impression_len: int
    minilm_trainable_layers: int


def _spec_from_v0(record: dict[str, Any], _tensors: Any) -> dict[str, Any]:
    """Records before specs: the sizes under ``model``, the encoder's network in the plan."""
    plan = record["plan"]
    return {
        **record["model"], "network": plan["network"], "in_channels": plan["in_channels"], "out_channels": len(plan["label_values"]),
        "text_encoder": record["text_encoder"],
    }  # fmt: skip


register_spec(PretrainSpec, {0: _spec_from_v0})


# -- model -------------------------------------------------------------------------------------
def build_pretrained(spec: PretrainSpec, load_minilm: bool = True) -> HybridMED:
    """The network ``spec`` describes (random weights, or MiniLM's where it is the text encoder):
    for training and for loading alike (``load_minilm=False``: the checkpoint brings them)."""
    if spec.text_encoder == "minilm":
        text: torch.nn.Module = MiniLMTextEncoder(spec.minilm_trainable_layers, load_weights=load_minilm)
    else:
        text = ScratchTextEncoder(spec.vocab_size, spec.width, spec.text_layers, spec.heads, spec.max_findings_len)
    return HybridMED(
        spec.network, spec.in_channels, spec.out_channels, text,
        spec.vocab_size, spec.width, spec.embed_dim, spec.decoder_layers, spec.heads, spec.max_impression_len, spec.token_stages,
    )  # fmt: skip


def _text_encoder_kind(cfg: PretrainConfig) -> str:
    if cfg.text_encoder != "auto":
        if cfg.text_encoder == "minilm":
            minilm_dir()  # a one-line error now, without the extra
        return cfg.text_encoder
    try:
        minilm_dir()
        import transformers  # noqa: F401
    except (MedalloyError, ImportError):
        return "scratch"
    return "minilm"


def objective_of(cfg: PretrainConfig, pad_id: int) -> HybridMEDObjective:
    """The run's weighted objective (``pad_id``: the report tokenizer's)."""
    w = cfg.weights
    weights = {"global": w.global_alignment, "token": w.token_alignment, "summary": w.summary, "caption": w.caption, "distill": w.distill}
    return HybridMEDObjective(cfg.losses, weights, cfg.token_scope, pad_id, cfg.distill_temperature)


# -- the recipe ----------------------------------------------------------------------------------
PAIRS = "pairs"  # the one "dataset" of split.json: the table of pairs, its ids row numbers


def _choose_plan(run: Run, plan: str | Path | Plan | None, cfg: PretrainConfig) -> Plan:
    from medalloy.planning.planner import plan_images_2d

    the_plan = given_or_kept_plan(run, plan, lambda: plan_images_2d(cfg.image_size, name="pretrain"))
    if the_plan.dim != 2 or the_plan.in_channels != 1:
        raise MedalloyError(
            f"pretraining encodes grey 2D radiographs; the plan is {the_plan.dim}D with {the_plan.in_channels} channel(s)",
            plan,
            "give the plan of a 2D X-ray dataset",
        )
    save_plan(the_plan, run.out / "plan.json")
    return the_plan


def _tokenizer(run: Run, texts: list[str], cfg: PretrainConfig) -> TextTokenizer:
    path = run.kept("tokenizer.json")
    if path is not None:
        return TextTokenizer.from_file(path)
    tok = train_report_tokenizer(texts, cfg.vocab_size)
    from medalloy.jsonio import write_text_atomic

    write_text_atomic(run.out / "tokenizer.json", tok.to_json())
    return tok


def _joint_validation(objective: HybridMEDObjective, val_batches: PairBatches) -> Callable[[dict], dict[str, float]]:
    """Stage 2's validation: the mean of each term, and image -> impression Recall@1/5/10 (a report
    with the same text counting as the image's own)."""

    def validate(ms: dict) -> dict[str, float]:
        rows, img_emb, txt_emb = [], [], []
        device = next(ms["model"].parameters()).device
        for b in val_batches.chunks():
            b = to_device(b, device)
            rows.append(objective.joint_step(ms, b, ms.get("teacher")))
            out = ms["model"](images=b["images"], impression_enc=b["impression_enc"], impression_enc_mask=b["impression_enc_mask"], parts=("global",))
            img_emb.append(out["image_global"].float())
            txt_emb.append(out["impression_global"].float())
        metrics = mean_terms(rows)
        recall = retrieval_recall(torch.cat(img_emb).cpu(), torch.cat(txt_emb).cpu(), keys=list(val_batches.texts.impression_key))
        metrics.update({f"val/{k}": v for k, v in recall.items()})
        return metrics

    return validate


def logged_terms(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's terms as every recipe logs them: ``loss`` (the total) and ``loss/<term>``."""
    return {"loss": out["loss"], **{f"loss/{k}": v for k, v in out.items() if k != "loss"}}


class PretrainRecipe(Recipe[PretrainConfig]):
    """Image-report pretraining: stage 1 (summarization, HybridMED only) then stage 2 (the joint
    objective, the stage-1 model frozen as the captioning branch's teacher), one HybridMED throughout."""

    METHOD = METHOD

    def __init__(
        self, cfg: PretrainConfig, pairs: str | Path, text_only: str | Path | None = None, plan: str | Path | Plan | None = None, progress: bool = True
    ):  # fmt: skip
        super().__init__(cfg, progress)
        self.pairs_csv, self.text_only_csv, self.given_plan = pairs, text_only, plan

    def check(self) -> None:
        cfg = self.cfg
        self.table = read_report_pairs(self.pairs_csv, cfg.columns, skip_empty=cfg.skip_empty)
        text_only = self.text_only_csv
        self.extra = read_text_pairs(text_only, cfg.text_only_findings, cfg.text_only_impression, skip_empty=cfg.skip_empty) if text_only is not None else None
        if len(self.table.pairs) < 4:
            n, fix = len(self.table.pairs), "give at least 4 pairs (hundreds to learn anything)"
            raise MedalloyError(f"{n} image-report pairs: too few to pretrain on", self.table.path, fix)
        self.kind = _text_encoder_kind(cfg)

    def inputs(self) -> dict[str, Any]:
        return {"pairs": str(self.table.path), "text_only": None if self.extra is None else str(self.extra.path), "text_encoder": self.kind}

    def prepare(self, run: Run) -> None:
        self.plan = run.main(lambda: _choose_plan(run, self.given_plan, self.cfg))

    def choose_split(self, run: Run) -> dict[str, Any]:
        ids = kept_split(run, [PAIRS])
        if ids is None:
            train, val = split_by_patient(self.table.pairs, self.cfg.val_fraction, self.cfg.train.seed)
            ids = {PAIRS: {"train": [p.row for p in train], "val": [p.row for p in val]}}
        by_row = {p.row: p for p in self.table.pairs}
        val_patients = sorted({by_row[r].patient for r in ids[PAIRS]["val"]})
        return split_record(None, ids, val_patients=val_patients, skipped=self.table.skipped)

    def train_spec(self, run: Run, split: dict[str, Any]) -> TrainSpec:
        cfg, ids, by_row = self.cfg, split["datasets"][PAIRS], {p.row: p for p in self.table.pairs}
        self.train_pairs, self.val_pairs = [by_row[r] for r in ids["train"]], [by_row[r] for r in ids["val"]]
        self.text_pairs: list[ReportPair] = list(self.extra.pairs) if self.extra is not None else []
        texts = [t for p in self.train_pairs + self.text_pairs for t in (p.findings, p.impression)]
        self.dec_tok = run.main(lambda: _tokenizer(run, texts, cfg))
        self.enc_tok = minilm_tokenizer(minilm_dir()) if self.kind == "minilm" else self.dec_tok
        spec = PretrainSpec.from_config(
            cfg, network=self.plan.network, in_channels=self.plan.in_channels, out_channels=self.plan.num_classes, text_encoder=self.kind,
            vocab_size=self.dec_tok.vocab_size,
        )  # fmt: skip
        seed_everything(cfg.train.seed)
        self.model = build_pretrained(spec)
        self.record = {
            "method": METHOD,
            "name": "pretrain",
            "spec": spec.to_record(),
            "plan": self.plan.model_dump(mode="json"),
            "tokenizer": self.dec_tok.to_json(),
            "losses": list(cfg.losses),
            "params": count_parameters(self.model),
        }
        self.objective = objective_of(cfg, self.dec_tok.pad_id)
        self.stage1 = self._summary_spec() if "generation" in cfg.losses else None
        return self._joint_spec(run)

    def _texts(self, pairs: list[ReportPair]) -> TextSet:
        return encode_reports(pairs, self.enc_tok, self.dec_tok, self.cfg.max_findings_len, self.cfg.max_impression_len)

    def _summary_spec(self) -> TrainSpec:
        """Stage 1: summarization on every report's text (the text-only table's and the training
        pairs'), validated on a seeded share of the text-only reports and the validation pairs."""
        cfg, seed, objective, text_pairs = self.cfg, self.cfg.train.seed, self.objective, self.text_pairs
        rng = np.random.default_rng(seed)
        val_text = [text_pairs[i] for i in rng.permutation(len(text_pairs))[: int(round(cfg.val_fraction * len(text_pairs)))]] if text_pairs else []
        val_rows = {p.row for p in val_text}
        train = self._texts([p for p in text_pairs if p.row not in val_rows] + self.train_pairs)
        val = PairBatches(self._texts(val_text + self.val_pairs), None, cfg.batch_size, seed, "summary-val", False)

        def validate(models: dict) -> dict[str, float]:
            device = next(models["model"].parameters()).device
            rows = [objective.summary_step(models["model"], to_device(b, device)) for b in val.chunks()]
            return {"val/summary": mean_terms(rows)["val/summary"]}

        return TrainSpec(
            models={"model": self.model},
            trainable=["model"],
            step_fn=lambda models, batch: logged_terms(objective.summary_step(models["model"], batch)),
            batches=PairBatches(train, None, cfg.batch_size, seed, STAGE1, False),
            record={**self.record, "name": "pretrain-summarize", "stage": STAGE1},
            validate=validate if len(val.texts) else None,
            monitor="val/summary",
            mode="min",
            find_unused_parameters=True,  # the image encoder and the captioning branch wait for stage 2
        )

    def _joint_spec(self, run: Run) -> TrainSpec:
        """Stage 2: every loss of the run on the image-report pairs (the teacher joins in :meth:`fit`)."""
        cfg, seed, objective = self.cfg, self.cfg.train.seed, self.objective
        train_imgs = cache_images(self.train_pairs, cfg.image_size, "caching train images", run.progress)
        val_imgs = cache_images(self.val_pairs, cfg.image_size, "caching val images", run.progress)
        enc_imp_train = encode_impressions([p.impression for p in self.train_pairs], self.enc_tok, cfg.max_impression_len)
        enc_imp_val = encode_impressions([p.impression for p in self.val_pairs], self.enc_tok, cfg.max_impression_len)
        batches = PairBatches(self._texts(self.train_pairs), train_imgs, cfg.batch_size, seed, "joint", cfg.augment, enc_imp_train)
        val_batches = PairBatches(self._texts(self.val_pairs), val_imgs, cfg.batch_size, seed, "joint-val", False, enc_imp_val)
        return TrainSpec(
            models={"model": self.model, "contrast": GlobalContrastiveLoss()},
            trainable=["model", "contrast"],
            step_fn=lambda ms, batch: logged_terms(objective.joint_step(ms, batch, ms.get("teacher"))),
            batches=batches,
            record={**self.record, "stage": "joint"},
            validate=_joint_validation(objective, val_batches) if self.val_pairs else None,
            monitor="val/loss",
            mode="min",
            find_unused_parameters=True,  # arms without generation leave the decoder unused
        )

    def fit(self, run: Run, spec: TrainSpec) -> dict[str, Any]:
        """Stage 1 (with generation) into ``RUN/summarize/``, its best model then frozen as stage 2's
        teacher; stage 2 into ``RUN/``."""
        self.stage1_summary = None
        if self.stage1 is not None:
            self.stage1_summary = self._summarize(run, self.stage1)
            spec = replace(spec, models={**spec.models, "teacher": copy.deepcopy(self.model).eval()})
        # killed after stage 1 and before stage 2's first checkpoint: stage 2 starts from its beginning
        resume = run.resume and (run.out / "checkpoints" / "last.safetensors").exists()
        return run.train(spec, self._joint_train_config(), resume=resume)

    def _summarize(self, run: Run, stage1: TrainSpec) -> dict[str, Any]:
        cfg = self.cfg
        s1_cfg = cfg.train.model_copy(update={"steps": cfg.summarize_steps})
        if cfg.train.time_budget_minutes:
            s1_cfg = s1_cfg.model_copy(update={"time_budget_minutes": cfg.train.time_budget_minutes * cfg.summarize_budget_fraction})
        summary = run.train(stage1, s1_cfg, stage=STAGE1, resume=run.resume and (run.out / STAGE1 / "checkpoints" / "last.safetensors").exists())
        tensors, _ = ckpt.load_checkpoint(run.out / STAGE1 / "checkpoints" / "best.safetensors", method=METHOD)
        ckpt.load_module_state(self.model, ckpt.group(tensors, "model/model"), run.out / STAGE1, "model", "start the run again without --resume")
        return summary

    def _joint_train_config(self) -> TrainConfig:
        cfg, stage1 = self.cfg, self.stage1_summary
        if not (cfg.train.time_budget_minutes and stage1 is not None):
            return cfg.train
        # the budget is the whole run's: stage 2 gets what stage 1 left (at least its share)
        spent = stage1["seconds"] / 60
        left = max(cfg.train.time_budget_minutes * (1 - cfg.summarize_budget_fraction), cfg.train.time_budget_minutes - spent)
        return cfg.train.model_copy(update={"time_budget_minutes": left})

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        extra, stage1 = self.extra, self.stage1_summary
        return {
            "losses": list(self.cfg.losses),
            "train_pairs": len(self.train_pairs),
            "val_pairs": len(self.val_pairs),
            "text_only_pairs": len(self.text_pairs),
            "skipped": {**self.table.skipped, **({f"text-only {k}": v for k, v in extra.skipped.items()} if extra is not None else {})},
            "params": self.record["params"],
            "summarize": None if stage1 is None else {k: stage1[k] for k in ("steps", "best", "seconds")},
        }


def pretrain(
    pairs: str | Path,
    out: str | Path,
    text_only: str | Path | None = None,
    plan: str | Path | Plan | None = None,
    config: str | Path | PretrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Pretrain an X-ray encoder on image-report ``pairs`` (CSV), optionally with a ``text_only``
    findings -> impression CSV for stage 1; returns the run summary (``run.json``)."""
    cfg = resolve_config(PretrainConfig, config, overrides, progress)
    return run_recipe(PretrainRecipe(cfg, pairs, text_only, plan, progress), out, resume=resume, overwrite=overwrite, progress=progress)


def load_pretrained(path: str | Path, device: str = "cpu") -> tuple[HybridMED, TextTokenizer, TextTokenizer, dict[str, Any]]:
    """``(model, text encoder tokenizer, report tokenizer, record)`` of a pretrain run or checkpoint; the
    record's ``spec`` is the current version's (records of earlier versions migrated), its
    ``temperature`` the learnt one of the global contrast."""
    from medalloy.recipes.init_weights import checkpoint_of

    file = checkpoint_of(path)
    tensors, record = ckpt.load_checkpoint(file, method=METHOD, map_location=device)
    spec = read_spec(PretrainSpec, record, file, tensors.keys())
    dec_tok = TextTokenizer.from_json(record["tokenizer"])
    enc_tok = minilm_tokenizer(minilm_dir()) if spec.text_encoder == "minilm" else dec_tok
    model = build_pretrained(spec, load_minilm=False)
    ckpt.load_module_state(model, ckpt.group(tensors, "model/model"), file, "model", "use the checkpoint with the medalloy version that wrote it")
    scale = tensors.get("model/contrast/logit_scale")
    record = {**record, "spec": spec.to_record(), "temperature": 0.07 if scale is None else float(1.0 / scale.float().exp().clamp(max=100.0))}
    return model.to(device).eval(), enc_tok, dec_tok, record


register_image_text(METHOD, load_pretrained)
