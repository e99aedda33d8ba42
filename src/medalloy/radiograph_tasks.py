"""What a pretrained X-ray encoder is for, besides starting experts: zero-shot classification by
text prompts, impression generation, image <-> text retrieval and linear probes.

``medalloy zeroshot RUN --images DIR --classes "COVID-19,No Finding"`` and ``medalloy caption RUN
--images DIR`` write one CSV row per image; ``medalloy probe RUN --pairs CSV`` (linear probe with 1,
10 and 100 % of the labels) and ``medalloy retrieve RUN --pairs CSV`` (Recall@1/5/10) write one JSON
of scores. The metric functions are what ``benchmarks/pretrain.py`` reports (BLEU-4 by sacrebleu,
ROUGE-L by rouge-score: the packages papers use, not our own).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medalloy.data.radiograph import load_radiograph
from medalloy.engine.metrics import retrieval_recall  # noqa: F401  (part of this module's API)
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path

if TYPE_CHECKING:
    from medalloy.data.reports import ReportColumns

IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".dcm", ".nii.gz", ".nii")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MedalloyError("image folder not found", folder, "give a folder of radiographs (PNG/JPG/DICOM)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_ENDINGS))
    if not files:
        raise MedalloyError("no images in the folder", folder, f"put radiographs ({', '.join(IMAGE_ENDINGS)}) in it")
    return files


@torch.inference_mode()
def encode_images(model: torch.nn.Module, paths: Sequence[Path], size: int, batch: int = 16, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global embeddings (N, E), patch tokens (N, P, width))`` of the images, unaugmented."""
    device = next(model.parameters()).device
    glob, patches = [], []
    for s in tqdm(range(0, len(paths), batch), desc="encoding images", unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(np.stack([load_radiograph(p, size) for p in paths[s : s + batch]])).to(device)
        g, p = model.image_features(x)
        glob.append(g.float().cpu())
        patches.append(p.float().cpu())
    return torch.cat(glob), torch.cat(patches)


@torch.inference_mode()
def encoder_features(model: torch.nn.Module, paths: Sequence[Path], size: int, batch: int = 16, progress: bool = False) -> torch.Tensor:
    """Pooled bottleneck features ``(N, C)`` of the images, unaugmented: the U-Net encoder (``model.image``)
    that a downstream model would start from, before any projection to the text side."""
    device = next(model.parameters()).device
    feats = []
    for s in tqdm(range(0, len(paths), batch), desc="encoding images", unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(np.stack([load_radiograph(p, size) for p in paths[s : s + batch]])).to(device)
        feats.append(model.image(x)[-1].mean(dim=(2, 3)).float().cpu())
    return torch.cat(feats)


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tok, texts: Sequence[str], max_len: int, batch: int = 64) -> torch.Tensor:
    """Global text embeddings ``(N, E)``."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch):
        ids, mask = tok.encode(list(texts[s : s + batch]), max_len)
        out.append(model.text_features(ids.to(device), mask.to(device))[0].float().cpu())
    return torch.cat(out)


def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(N images, M texts)``."""
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()


def zero_shot_probs(image_emb: torch.Tensor, class_emb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Class probabilities ``(N, K)``: softmax over the prompts' cosine similarities / temperature."""
    return torch.softmax(similarity(image_emb, class_emb) / temperature, dim=1)


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the true classes of the share predicted right (chance: 1 / classes, whatever the mix)."""
    return float(np.mean([np.mean(pred[truth == c] == c) for c in np.unique(truth)]))


def linear_probe(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    fraction: float = 1.0,
    seed: int = 0,
    weight_decay: float = 1e-3,
    balanced: bool = False,
) -> float:
    """Accuracy (``balanced``: :func:`balanced_accuracy`) of a multinomial logistic regression
    (L-BFGS, standardised features) trained on a class-stratified ``fraction`` of the training set
    (at least one example a class): :func:`probe_predictions`."""
    pred, _ = probe_predictions(train_x, train_y, test_x, fraction, seed, weight_decay)
    return balanced_accuracy(pred, test_y) if balanced else float(np.mean(pred == test_y))


def probe_predictions(
    train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, fraction: float = 1.0, seed: int = 0, weight_decay: float = 1e-3
) -> tuple[np.ndarray, int]:
    """The test set's predicted classes by the logistic regression of :func:`linear_probe`, and how
    many training labels it learnt from."""
    classes = sorted(set(train_y.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(train_y == c)
        chosen.extend(rng.choice(idx, max(1, int(round(fraction * len(idx)))), replace=False).tolist())
    chosen = np.sort(np.asarray(chosen))
    x = train_x[chosen].double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(chosen) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    x = (x - mean) / std
    y = torch.tensor([index[c] for c in train_y[chosen]])
    w = torch.zeros(x.shape[1], len(classes), dtype=x.dtype, requires_grad=True)
    b = torch.zeros(len(classes), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = np.array([classes[p] for p in ((test_x.double() - mean) / std @ w + b).argmax(1).numpy()])
    return pred, len(chosen)


def caption_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 0-100 scaled to 0-1) and mean ROUGE-L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError("give one reference per prediction")
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))
    return {"bleu4": float(bleu), "rougeL": rouge}


@torch.inference_mode()
def generate_impressions(model: torch.nn.Module, dec_tok, patches: torch.Tensor, batch: int = 32) -> list[str]:
    device = next(model.parameters()).device
    out = []
    for s in range(0, patches.shape[0], batch):
        ids = model.decoder.generate(patches[s : s + batch].to(device), None, "caption", dec_tok.bos_id, dec_tok.eos_id)
        out.extend(dec_tok.decode(row) for row in ids.cpu())
    return out


def _write_csv(path: str | Path, header: Sequence[str], rows: list[Sequence]) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def zeroshot(
    run: str | Path, images: str | Path, classes: Sequence[str], out: str | Path, prompt: str = "{}", device: str = "cpu", progress: bool = True
) -> Path:
    """Classify every image of ``images`` among ``classes`` by the prompts ``prompt.format(class)``;
    writes ``out`` (CSV: image, predicted class, one probability column a class)."""
    from medalloy.recipes.registry import load_image_text_model

    classes = [c.strip() for c in classes if c.strip()]
    if len(classes) < 2:
        raise MedalloyError(f"zero-shot needs at least two classes, got {classes}", fix='give --classes "COVID-19,No Finding"')
    model, enc_tok, _dec, record = load_image_text_model(run, device)
    paths = list_images(images)
    img, _ = encode_images(model, paths, record["plan"]["patch_size"][0], progress=progress)
    txt = encode_texts(model, enc_tok, [prompt.format(c) for c in classes], record["spec"]["max_impression_len"])
    probs = zero_shot_probs(img, txt, record["temperature"])
    rows = [[p.name, classes[int(pr.argmax())], *[f"{v:.4f}" for v in pr.tolist()]] for p, pr in zip(paths, probs)]
    return _write_csv(out, ["image", "predicted", *classes], rows)


def caption(run: str | Path, images: str | Path, out: str | Path, device: str = "cpu", progress: bool = True) -> Path:
    """Generate an impression for every image of ``images``; writes ``out`` (CSV: image, impression)."""
    from medalloy.recipes.registry import load_image_text_model

    model, _enc, dec_tok, record = load_image_text_model(run, device)
    if "generation" not in record.get("losses", []):
        raise MedalloyError("this pretraining run has no generation decoder trained", run, "pretrain with --losses global token generation")
    paths = list_images(images)
    _, patches = encode_images(model, paths, record["plan"]["patch_size"][0], progress=progress)
    texts = generate_impressions(model, dec_tok, patches)
    return _write_csv(out, ["image", "impression"], [[p.name, t] for p, t in zip(paths, texts)])


def probe(
    run: str | Path,
    pairs: str | Path,
    out: str | Path,
    columns: ReportColumns | None = None,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    test_fraction: float = 0.25,
    seed: int = 0,
    skip_empty: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Linear probe of a pretrain run's frozen image encoder (downstream use 2).

    The image-report ``pairs`` (CSV, :func:`~medalloy.data.reports.read_report_pairs` with ``columns``;
    default: the label in column ``finding``) are split by patient, ``test_fraction`` of the patients
    held out (chosen by ``seed``: :func:`~medalloy.data.reports.split_by_patient`, as
    ``benchmarks/pretrain.py`` holds out its test set). For each of ``fractions``, a logistic
    regression (:func:`linear_probe`) on the pooled bottleneck features (:func:`encoder_features`)
    of a class-stratified share of the training images' labels predicts the held-out images' labels:
    accuracy and balanced accuracy. Writes ``out`` (JSON) and returns what it holds.
    """
    from medalloy.data.reports import ReportColumns, read_report_pairs, split_by_patient
    from medalloy.jsonio import write_json_atomic
    from medalloy.recipes.registry import load_image_text_model

    columns = ReportColumns(label="finding") if columns is None else columns
    if columns.label is None:
        raise MedalloyError("the linear probe needs a label column", fix="name it with --label-column (label= in ReportColumns)")
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0]
    if bad or not fractions:
        raise MedalloyError(f"label fractions must be in (0, 1], got {list(fractions)}", fix="give e.g. --fractions 0.01 0.1 1.0")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise MedalloyError(f"the held-out fraction must be in (0, 1), got {test_fraction!r}", fix="give e.g. --test-fraction 0.25")
    model, _enc, _dec, record = load_image_text_model(run, device)
    table = read_report_pairs(pairs, columns, skip_empty=skip_empty)
    unlabelled = next((p for p in table.pairs if p.label is None), None)
    if unlabelled is not None:
        raise MedalloyError(f"line {unlabelled.row}: empty label (column '{columns.label}')", table.path, "fill in the class or remove the row")
    train, test = split_by_patient(table.pairs, test_fraction, seed)
    patients = sorted({p.patient for p in table.pairs})
    if not test:
        raise MedalloyError(f"{len(patients)} patient(s): none to hold out for testing", table.path, "give the pairs of two or more patients")
    classes = sorted({p.label for p in train})
    if len(classes) < 2:
        raise MedalloyError(
            f"the training patients' images all have the label {classes[0]!r}: nothing to tell apart", table.path, "give pairs of two or more classes"
        )
    size = record["plan"]["patch_size"][0]
    train_x = encoder_features(model, [p.image for p in train], size, progress=progress)
    test_x = encoder_features(model, [p.image for p in test], size, progress=progress)
    train_y, test_y = np.array([p.label for p in train]), np.array([p.label for p in test])
    scores = []
    for fraction in fractions:
        pred, used = probe_predictions(train_x, train_y, test_x, float(fraction), seed)
        scores.append(
            {"fraction": float(fraction), "labels": used, "accuracy": float(np.mean(pred == test_y)), "balanced_accuracy": balanced_accuracy(pred, test_y)}
        )
    top = max(sorted(set(test_y.tolist())), key=test_y.tolist().count)
    result = {
        "run": str(run),
        "pairs": str(table.path),
        "label_column": columns.label,
        "classes": classes,
        "features": f"pooled bottleneck ({train_x.shape[1]})",
        "seed": seed,
        "test_fraction": test_fraction,
        "train_images": len(train),
        "test_images": len(test),
        "test_patients": sorted({p.patient for p in test}),
        "skipped": table.skipped,
        # floors: always answering the held-out set's most common class, and any constant answer's balanced accuracy
        "majority": {"class": top, "accuracy": float(np.mean(test_y == top)), "balanced_accuracy": 1.0 / len(set(test_y.tolist()))},
        "scores": scores,
    }
    write_json_atomic(out, result)
    return result


def retrieve(
    run: str | Path,
    pairs: str | Path,
    out: str | Path,
    columns: ReportColumns | None = None,
    ks: Sequence[int] = (1, 5, 10),
    skip_empty: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Image <-> impression retrieval with a pretrain run (downstream use 3), on every pair of ``pairs``
    (CSV, :func:`~medalloy.data.reports.read_report_pairs` with ``columns``).

    Each image's global embedding against every pair's impression (cosine): ``image_to_text`` Recall@k
    is the share of images whose own impression is among the ``k`` most similar texts, ``text_to_image``
    the share of impressions whose own image is among the ``k`` most similar images
    (:func:`retrieval_recall` both ways); an impression identical to the pair's own (case and
    whitespace aside) counts as its own. Writes ``out`` (JSON) and returns what it holds.
    """
    from medalloy.data.reports import ReportColumns, read_report_pairs
    from medalloy.jsonio import write_json_atomic
    from medalloy.recipes.registry import load_image_text_model

    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise MedalloyError(f"Recall@k needs whole numbers k >= 1, got {list(ks)}", fix="give e.g. --k 1 5 10")
    ks = sorted(set(ks))
    model, enc_tok, _dec, record = load_image_text_model(run, device)
    table = read_report_pairs(pairs, ReportColumns() if columns is None else columns, skip_empty=skip_empty)
    if len(table.pairs) < 2:
        raise MedalloyError(f"{len(table.pairs)} image-report pair(s): nothing to retrieve among", table.path, "give two or more pairs")
    images, _ = encode_images(model, [p.image for p in table.pairs], record["plan"]["patch_size"][0], progress=progress)
    texts = encode_texts(model, enc_tok, [p.impression for p in table.pairs], record["spec"]["max_impression_len"])
    keys = [" ".join(p.impression.lower().split()) for p in table.pairs]
    result = {
        "run": str(run),
        "pairs": str(table.path),
        "pairs_scored": len(table.pairs),
        "distinct_impressions": len(set(keys)),
        "skipped": table.skipped,
        "ks": ks,
        "image_to_text": retrieval_recall(images, texts, keys=keys, ks=ks),
        "text_to_image": retrieval_recall(texts, images, keys=keys, ks=ks),
    }
    write_json_atomic(out, result)
    return result
