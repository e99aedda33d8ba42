"""Image-report pretraining (HybridMED, Jiang et al. arXiv 2410.00448; design in
docs/methods/pretraining.md): ``medalloy train pretrain --pairs CSV [--text-only CSV] --out RUN``.

Two stages, both through the shared engine:

1. *summarization* (``RUN/summarize/``): the text encoder and the decoder's summarization branch
   learn findings -> impression on every report (the text-only table and the pairs' text);
2. *joint* (``RUN/``): L = w_global L_global + w_token L_token + w_summary L_sum + w_caption L_cap
   + w_distill L_dis (``weights`` in the config: global_alignment, token_alignment, summary, caption, distill), with a frozen copy of the stage-1 model as the summarization teacher of the
   captioning branch. ``losses`` picks the arms: ``[global]`` (ConVIRT/CLIP style), ``[global,
   token]`` (GLoRIA/MGCA style) or all three groups (HybridMED; only it runs stage 1).

Run folder::

    RUN/run.json  plan.json  config.yaml  split.json (patients)  tokenizer.json
    RUN/summarize/{metrics.jsonl, training_curve.png, checkpoints/}
    RUN/metrics.jsonl  training_curve.png  checkpoints/{best,last}.safetensors (+ .json)

The checkpoint's record holds the plan, the tokenizer and the model's sizes, so ``zeroshot``,
``caption`` and ``train expert --init RUN`` need nothing else.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from medalloy.data.radiograph import augment_batch, load_radiograph
from medalloy.data.reports import ReportColumns, ReportPair, read_report_pairs, read_text_pairs, split_by_patient
from medalloy.data.tokenizer import TextTokenizer, train_report_tokenizer
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.metrics import retrieval_recall
from medalloy.engine.trainer import TrainConfig, TrainSpec, to_device
from medalloy.errors import MedalloyError
from medalloy.losses.generation_distill import GenerationDistillLoss
from medalloy.losses.global_contrastive import GlobalContrastiveLoss
from medalloy.losses.language_model import LanguageModelLoss
from medalloy.losses.token_alignment import TokenAlignmentLoss
from medalloy.models.hybridmed import HybridMED
from medalloy.models.text_encoder import MiniLMTextEncoder, ScratchTextEncoder, minilm_dir
from medalloy.models.unet import count_parameters
from medalloy.planning.plan import NetworkPlan, Plan, save_plan
from medalloy.recipes.scaffold import Run, given_or_kept_plan, open_run, resolve_config
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.seeding import seed_everything, step_rng

METHOD = "pretrain"
STAGE1 = "summarize"
# top-level settings the command line (or **overrides) sets; ``columns`` is a mapping that changes only the fields it names
TOP_KEYS = (
    "batch_size", "image_size", "text_encoder", "losses", "summarize_steps", "skip_empty", "token_scope", "columns", "val_fraction",
    "text_only_findings", "text_only_impression",
)  # fmt: skip
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
    losses: list[LossGroup] = Field(default_factory=lambda: ["global", "token", "generation"], min_length=1)
    weights: LossWeights = Field(default_factory=LossWeights)
    summarize_steps: int = Field(500, ge=1)
    # share of the run's wall-clock budget (train.time_budget_minutes) given to stage 1; stage 2 gets the rest
    summarize_budget_fraction: float = Field(0.2, gt=0, lt=1)
    image_size: int = Field(224, ge=16)
    text_encoder: Literal["auto", "scratch", "minilm"] = "auto"
    minilm_trainable_layers: int = Field(2, ge=0, le=6)
    batch_size: int = Field(16, ge=2)
    width: int = Field(256, ge=16)
    embed_dim: int = Field(128, ge=8)
    text_layers: int = Field(4, ge=1)
    decoder_layers: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)
    token_stages: int = Field(2, ge=1)
    # token-level contrast over every image-report pair of the batch (GLoRIA), or within each matched
    # pair (MGCA; B times cheaper): losses/token_alignment.py
    token_scope: Literal["batch", "pair"] = "batch"
    vocab_size: int = Field(4000, ge=16)
    max_findings_len: int = Field(128, ge=8)
    max_impression_len: int = Field(32, ge=4)
    distill_temperature: float = Field(2.0, gt=0)
    val_fraction: float = Field(0.15, ge=0, lt=1)
    augment: bool = True


class PretrainSpec(ModelSpec):
    """A :class:`~medalloy.models.hybridmed.HybridMED`: a DynUNet encoder of ``network`` for grey
    radiographs, a ``text_encoder`` (scratch: of ``vocab_size``, ``width``, ``text_layers``; MiniLM:
    ``minilm_trainable_layers`` of it trained), and the report decoder (fields as in :class:`PretrainConfig`)."""

    METHOD: ClassVar[str] = METHOD

    network: NetworkPlan
    in_channels: int = Field(1, ge=1)
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
    return {**record["model"], "network": plan["network"], "in_channels": plan["in_channels"], "text_encoder": record["text_encoder"]}


register_spec(PretrainSpec, {0: _spec_from_v0})


# -- data --------------------------------------------------------------------------------------
@dataclass
class TextSet:
    """Tokenised findings and impressions of some reports; ``*_key`` are the texts compared for
    "the same report" (identical texts are positives, not negatives, in the contrastive losses)."""

    findings: torch.Tensor
    findings_mask: torch.Tensor
    impression: torch.Tensor
    impression_mask: torch.Tensor
    findings_key: np.ndarray
    impression_key: np.ndarray

    def __len__(self) -> int:
        return int(self.findings.shape[0])


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def encode_reports(pairs: list[ReportPair], enc_tok: TextTokenizer, dec_tok: TextTokenizer, cfg: PretrainConfig) -> TextSet:
    f, fm = enc_tok.encode([p.findings for p in pairs], cfg.max_findings_len)
    i, im = dec_tok.encode([p.impression for p in pairs], cfg.max_impression_len)
    return TextSet(f, fm, i, im, np.array([_key(p.findings) for p in pairs]), np.array([_key(p.impression) for p in pairs]))


def encode_impressions(texts: list[str], tok: TextTokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as the global branch sees them (the text encoder's tokenizer)."""
    return tok.encode(texts, max_len)


def cache_images(pairs: list[ReportPair], size: int, desc: str, progress: bool) -> torch.Tensor:
    out = np.zeros((len(pairs), 1, size, size), dtype=np.float32)
    for k, p in enumerate(tqdm(pairs, desc=desc, unit="image", disable=not progress, leave=False)):
        out[k] = load_radiograph(p.image, size)
    return torch.from_numpy(out)


def _used(mask: torch.Tensor) -> int:
    """Columns up to the longest sequence of a batch (at least 2: a begin and an end token)."""
    return max(2, int(mask.sum(1).max()))


def _positives(keys: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(keys[:, None] == keys[None, :])


class PairBatches:
    """Batch ``step`` of ``batch`` reports drawn without replacement from a seeded generator of
    ``(seed, step, rank)``; images (if any) augmented by the same generator."""

    def __init__(
        self,
        texts: TextSet,
        images: torch.Tensor | None,
        batch: int,
        seed: int,
        tag: str,
        augment: bool,
        impression_enc: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.texts, self.images, self.batch, self.seed, self.tag, self.augment = texts, images, min(batch, len(texts)), seed, tag, augment
        self.impression_enc = impression_enc

    def take(self, idx: np.ndarray, rng: np.random.Generator | None) -> dict[str, Any]:
        t = torch.from_numpy(idx)
        fm, im = self.texts.findings_mask[t], self.texts.impression_mask[t]
        nf, ni = _used(fm), _used(im)  # padding every batch shares costs attention for nothing: cut it
        out: dict[str, Any] = {
            "findings": self.texts.findings[t, :nf],
            "findings_mask": fm[:, :nf],
            "impression": self.texts.impression[t, :ni],
            "impression_mask": im[:, :ni],
            "same_findings": _positives(self.texts.findings_key[idx]),
            "same_impression": _positives(self.texts.impression_key[idx]),
        }
        if self.impression_enc is not None:
            em = self.impression_enc[1][t]
            ne = _used(em)
            out["impression_enc"], out["impression_enc_mask"] = self.impression_enc[0][t, :ne], em[:, :ne]
        if self.images is not None:
            img = self.images[t]
            out["images"] = augment_batch(img, rng) if (self.augment and rng is not None) else img
        return out

    def __call__(self, step: int, dist: Any) -> dict[str, Any]:
        rng = step_rng(self.seed, self.tag, step, dist.rank)
        return self.take(rng.choice(len(self.texts), self.batch, replace=False), rng)

    def chunks(self):
        """The whole set in order, unaugmented, in batches (validation)."""
        for s in range(0, len(self.texts), self.batch):
            yield self.take(np.arange(s, min(s + self.batch, len(self.texts))), None)


# -- models ------------------------------------------------------------------------------------
def minilm_tokenizer() -> TextTokenizer:
    """MiniLM's own (BERT WordPiece) tokenizer, from the package that ships its weights."""
    return TextTokenizer.from_file(minilm_dir() / "tokenizer.json", special=("[PAD]", "[CLS]", "[SEP]"))


def build_model(record: dict[str, Any], plan: Plan, load_minilm: bool = True) -> HybridMED:
    """The network a record describes (weights random, or MiniLM's where it is the text encoder)."""
    m = record["model"]
    if record["text_encoder"] == "minilm":
        text: torch.nn.Module = MiniLMTextEncoder(m["minilm_trainable_layers"], load_weights=load_minilm)
    else:
        text = ScratchTextEncoder(m["vocab_size"], m["width"], m["text_layers"], m["heads"], m["max_findings_len"])
    return HybridMED(
        plan.network, plan.in_channels, plan.num_classes, text,
        m["vocab_size"], m["width"], m["embed_dim"], m["decoder_layers"], m["heads"], m["max_impression_len"], m["token_stages"],
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


def _model_record(cfg: PretrainConfig, vocab: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab, "width": cfg.width, "embed_dim": cfg.embed_dim, "text_layers": cfg.text_layers, "decoder_layers": cfg.decoder_layers,
        "heads": cfg.heads, "token_stages": cfg.token_stages, "max_findings_len": cfg.max_findings_len, "max_impression_len": cfg.max_impression_len,
        "minilm_trainable_layers": cfg.minilm_trainable_layers,
    }  # fmt: skip


# -- steps -------------------------------------------------------------------------------------
class Objective:
    """The weighted losses of stage 2 (and stage 1's summarization loss alone)."""

    def __init__(self, cfg: PretrainConfig, pad_id: int):
        self.cfg, self.groups, self.w = cfg, set(cfg.losses), cfg.weights
        self.token = TokenAlignmentLoss(scope=cfg.token_scope)
        self.lm = LanguageModelLoss(pad_id=pad_id)
        self.distill = GenerationDistillLoss(temperature=cfg.distill_temperature)

    def parts(self) -> tuple[str, ...]:
        p = []
        if "global" in self.groups:
            p.append("global")
        if "token" in self.groups:
            p.append("token")
        if "generation" in self.groups:
            p += ["summary", "caption"]
        return tuple(p)

    def summary_step(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model(findings=batch["findings"], findings_mask=batch["findings_mask"], impression=batch["impression"], parts=("summary",))
        loss = self.lm(out["summary_logits"], batch["impression"][:, 1:])
        return {"loss": loss, "summary": loss.detach()}

    def joint_step(self, models: dict, batch: dict, teacher: torch.nn.Module | None) -> dict[str, torch.Tensor]:
        parts = self.parts()
        out = models["model"](
            images=batch["images"], findings=batch["findings"], findings_mask=batch["findings_mask"], impression=batch["impression"],
            impression_enc=batch["impression_enc"], impression_enc_mask=batch["impression_enc_mask"], parts=parts,
        )  # fmt: skip
        terms: dict[str, torch.Tensor] = {}
        if "global" in parts:
            terms["global"] = models["contrast"](out["image_global"], out["impression_global"], batch["same_impression"])
        if "token" in parts:
            terms["token"] = self.token(out["patches"], out["words"], batch["findings_mask"], batch["same_findings"])
        if "summary" in parts:
            target = batch["impression"][:, 1:]
            terms["summary"] = self.lm(out["summary_logits"], target)
            terms["caption"] = self.lm(out["caption_logits"], target)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(findings=batch["findings"], findings_mask=batch["findings_mask"], impression=batch["impression"], parts=("summary",))
                terms["distill"] = self.distill(
                    out["caption_logits"], t["summary_logits"], out["caption_hidden"], t["summary_hidden"], batch["impression_mask"][:, 1:]
                )
        weights = {
            "global": self.w.global_alignment,
            "token": self.w.token_alignment,
            "summary": self.w.summary,
            "caption": self.w.caption,
            "distill": self.w.distill,
        }
        loss = sum(weights[k] * v for k, v in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


def _mean_metrics(rows: list[dict[str, torch.Tensor]], prefix: str = "val/") -> dict[str, float]:
    keys = rows[0].keys()
    return {f"{prefix}{k}": float(np.mean([float(r[k]) for r in rows])) for k in keys}


# -- the recipe ----------------------------------------------------------------------------------
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


def _split(run: Run, pairs: list[ReportPair], cfg: PretrainConfig) -> dict[str, list[int]]:
    if run.kept("split.json"):
        saved = run.read_json("split.json")
        return {"train": saved["train"], "val": saved["val"]}
    train, val = split_by_patient(pairs, cfg.val_fraction, cfg.train.seed)
    return {"train": [p.row for p in train], "val": [p.row for p in val]}


def _tokenizer(run: Run, texts: list[str], cfg: PretrainConfig) -> TextTokenizer:
    path = run.kept("tokenizer.json")
    if path is not None:
        return TextTokenizer.from_file(path)
    tok = train_report_tokenizer(texts, cfg.vocab_size)
    from medalloy.jsonio import write_text_atomic

    write_text_atomic(run.out / "tokenizer.json", tok.to_json())
    return tok


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
    cfg = resolve_config(PretrainConfig, config, overrides, progress, TOP_KEYS)
    table = read_report_pairs(pairs, cfg.columns, skip_empty=cfg.skip_empty)
    extra = read_text_pairs(text_only, cfg.text_only_findings, cfg.text_only_impression, skip_empty=cfg.skip_empty) if text_only is not None else None
    if len(table.pairs) < 4:
        raise MedalloyError(f"{len(table.pairs)} image-report pairs: too few to pretrain on", table.path, "give at least 4 pairs (hundreds to learn anything)")
    kind = _text_encoder_kind(cfg)
    run = open_run(out, cfg.train, overwrite=overwrite, resume=resume, progress=progress)
    the_plan = run.main(lambda: _choose_plan(run, plan, cfg))
    run.write_config(cfg)
    ids = run.main(lambda: _split(run, table.pairs, cfg))
    by_row = {p.row: p for p in table.pairs}
    train_pairs, val_pairs = [by_row[r] for r in ids["train"]], [by_row[r] for r in ids["val"]]
    run.write_json("split.json", {**ids, "val_patients": sorted({p.patient for p in val_pairs}), "skipped": table.skipped})
    text_pairs = list(extra.pairs) if extra is not None else []
    dec_tok = run.main(lambda: _tokenizer(run, [t for p in train_pairs + text_pairs for t in (p.findings, p.impression)], cfg))
    enc_tok = minilm_tokenizer() if kind == "minilm" else dec_tok
    run.status(METHOD, pairs=str(table.path), text_only=None if extra is None else str(extra.path), text_encoder=kind)

    seed = cfg.train.seed
    record = {
        "method": METHOD,
        "name": "pretrain",
        "plan": the_plan.model_dump(mode="json"),
        "text_encoder": kind,
        "model": _model_record(cfg, dec_tok.vocab_size),
        "tokenizer": dec_tok.to_json(),
        "losses": list(cfg.losses),
    }
    seed_everything(seed)
    model = build_model(record, the_plan)
    record["params"] = count_parameters(model)
    objective = Objective(cfg, dec_tok.pad_id)
    generation = "generation" in cfg.losses

    # Stage 1: summarization on every report's text.
    stage1_summary = None
    if generation:
        rng = np.random.default_rng(seed)
        val_text = [text_pairs[i] for i in rng.permutation(len(text_pairs))[: int(round(cfg.val_fraction * len(text_pairs)))]] if text_pairs else []
        val_rows = {p.row for p in val_text}
        s1_train = encode_reports([p for p in text_pairs if p.row not in val_rows] + train_pairs, enc_tok, dec_tok, cfg)
        s1_val = PairBatches(encode_reports(val_text + val_pairs, enc_tok, dec_tok, cfg), None, cfg.batch_size, seed, "summary-val", False)

        def validate_summary(models: dict) -> dict[str, float]:
            device = next(models["model"].parameters()).device
            rows = [objective.summary_step(models["model"], to_device(b, device)) for b in s1_val.chunks()]
            return {"val/summary": _mean_metrics(rows)["val/summary"]}

        s1_cfg = cfg.train.model_copy(update={"steps": cfg.summarize_steps})
        if cfg.train.time_budget_minutes:
            s1_cfg = s1_cfg.model_copy(update={"time_budget_minutes": cfg.train.time_budget_minutes * cfg.summarize_budget_fraction})
        s1_spec = TrainSpec(
            models={"model": model},
            trainable=["model"],
            step_fn=lambda models, batch: objective.summary_step(models["model"], batch),
            batches=PairBatches(s1_train, None, cfg.batch_size, seed, STAGE1, False),
            record={**record, "name": "pretrain-summarize", "stage": STAGE1},
            validate=validate_summary if len(s1_val.texts) else None,
            monitor="val/summary",
            mode="min",
            find_unused_parameters=True,  # the image encoder and the captioning branch wait for stage 2
        )
        stage1_summary = run.train(s1_spec, s1_cfg, stage=STAGE1, resume=resume and (run.out / STAGE1 / "checkpoints" / "last.safetensors").exists())
        tensors, _ = ckpt.load_checkpoint(run.out / STAGE1 / "checkpoints" / "best.safetensors", method=METHOD)
        ckpt.load_module_state(model, ckpt.group(tensors, "model/model"), run.out / STAGE1, "model", "start the run again without --resume")

    # Stage 2: all losses; the stage-1 model, frozen, teaches the captioning branch.
    teacher = copy.deepcopy(model).eval() if generation else None
    train_imgs = cache_images(train_pairs, cfg.image_size, "caching train images", run.progress)
    val_imgs = cache_images(val_pairs, cfg.image_size, "caching val images", run.progress)
    enc_imp_train = enc_tok.encode([p.impression for p in train_pairs], cfg.max_impression_len)
    enc_imp_val = enc_tok.encode([p.impression for p in val_pairs], cfg.max_impression_len)
    batches = PairBatches(encode_reports(train_pairs, enc_tok, dec_tok, cfg), train_imgs, cfg.batch_size, seed, "joint", cfg.augment, enc_imp_train)
    val_batches = PairBatches(encode_reports(val_pairs, enc_tok, dec_tok, cfg), val_imgs, cfg.batch_size, seed, "joint-val", False, enc_imp_val)
    contrast = GlobalContrastiveLoss()
    models = {"model": model, "contrast": contrast}
    if teacher is not None:
        models["teacher"] = teacher

    def validate(ms: dict) -> dict[str, float]:
        rows, img_emb, txt_emb = [], [], []
        device = next(ms["model"].parameters()).device
        for b in val_batches.chunks():
            b = to_device(b, device)
            rows.append(objective.joint_step(ms, b, ms.get("teacher")))
            out = ms["model"](images=b["images"], impression_enc=b["impression_enc"], impression_enc_mask=b["impression_enc_mask"], parts=("global",))
            img_emb.append(out["image_global"].float())
            txt_emb.append(out["impression_global"].float())
        metrics = _mean_metrics(rows)
        # image -> impression Recall@1/5/10, a report with the same text counting as the image's own
        recall = retrieval_recall(torch.cat(img_emb).cpu(), torch.cat(txt_emb).cpu(), keys=list(val_batches.texts.impression_key))
        metrics.update({f"val/{k}": v for k, v in recall.items()})
        return metrics

    spec = TrainSpec(
        models=models,
        trainable=["model", "contrast"],
        step_fn=lambda ms, batch: objective.joint_step(ms, batch, ms.get("teacher")),
        batches=batches,
        record={**record, "stage": "joint"},
        validate=validate if val_pairs else None,
        monitor="val/loss",
        mode="min",
        find_unused_parameters=True,  # arms without generation leave the decoder unused
    )
    s2_cfg = cfg.train
    if cfg.train.time_budget_minutes and stage1_summary is not None:
        # the budget is the whole run's: stage 2 gets what stage 1 left (at least its share)
        spent = stage1_summary["seconds"] / 60
        left = max(cfg.train.time_budget_minutes * (1 - cfg.summarize_budget_fraction), cfg.train.time_budget_minutes - spent)
        s2_cfg = cfg.train.model_copy(update={"time_budget_minutes": left})
    summary = run.train(spec, s2_cfg)
    result = {
        "method": METHOD,
        "status": "done",
        "pairs": str(table.path),
        "text_only": None if extra is None else str(extra.path),
        "text_encoder": kind,
        "losses": list(cfg.losses),
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "text_only_pairs": len(text_pairs),
        "skipped": {**table.skipped, **({f"text-only {k}": v for k, v in extra.skipped.items()} if extra is not None else {})},
        "params": record["params"],
        "summarize": None if stage1_summary is None else {k: stage1_summary[k] for k in ("steps", "best", "seconds")},
        **summary,
    }
    run.write_json("run.json", result)
    return result


def load_pretrained(path: str | Path, device: str = "cpu") -> tuple[HybridMED, TextTokenizer, TextTokenizer, dict[str, Any]]:
    """``(model, text encoder tokenizer, report tokenizer, record)`` of a pretrain run or checkpoint."""
    from medalloy.recipes.init_weights import checkpoint_of

    file = checkpoint_of(path)
    tensors, record = ckpt.load_checkpoint(file, method=METHOD, map_location=device)
    plan = Plan.model_validate(record["plan"])
    dec_tok = TextTokenizer.from_json(record["tokenizer"])
    enc_tok = minilm_tokenizer() if record["text_encoder"] == "minilm" else dec_tok
    model = build_model(record, plan, load_minilm=False)
    ckpt.load_module_state(model, ckpt.group(tensors, "model/model"), file, "model", "use the checkpoint with the medalloy version that wrote it")
    scale = tensors.get("model/contrast/logit_scale")
    record = {**record, "temperature": 0.07 if scale is None else float(1.0 / scale.float().exp().clamp(max=100.0))}
    return model.to(device).eval(), enc_tok, dec_tok, record
