"""What a pretrained X-ray encoder is for, besides starting experts: zero-shot classification by
text prompts, impression generation, image <-> text retrieval and linear probes.

``medalloy zeroshot RUN --images DIR --classes "COVID-19,No Finding"`` and ``medalloy caption RUN
--images DIR`` write one CSV row per image; ``medalloy probe RUN --pairs CSV`` (linear probe with 1,
10 and 100 % of the labels) and ``medalloy retrieve RUN --pairs CSV`` (Recall@1/5/10) write one JSON
of scores. The commands only load the run and put the layers' pieces together: reading images
(``data/radiograph.py``), encoding them (``engine/radiograph_encoding.py``, ``models/image_text.py``),
the probe (``engine/linear_probe.py``) and the metrics (``engine/metrics.py``), which
``benchmarks/pretrain.py`` reports too.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medalloy.data.radiograph import list_images
from medalloy.engine.linear_probe import probe_scores
from medalloy.engine.metrics import retrieval_recall
from medalloy.engine.radiograph_encoding import encode_images, encoder_features
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path
from medalloy.models.image_text import encode_texts, generate_impressions, zero_shot_probs

if TYPE_CHECKING:
    from medalloy.data.reports import ReportColumns, ReportPair, ReportTable


def _write_csv(path: str | Path, header: Sequence[str], rows: list[Sequence]) -> Path:
    """``header`` then ``rows`` to ``path`` (UTF-8 CSV), whole or not at all (:func:`~medalloy.jsonio.atomic_path`)."""
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
    regression (:func:`~medalloy.engine.linear_probe.linear_probe`) on the pooled bottleneck features
    (:func:`~medalloy.engine.radiograph_encoding.encoder_features`) of a class-stratified share of the
    training images' labels predicts the held-out images' labels: accuracy and balanced accuracy.
    Writes ``out`` (JSON) and returns what it holds.
    """
    from medalloy.data.reports import read_report_pairs
    from medalloy.jsonio import write_json_atomic
    from medalloy.recipes.registry import load_image_text_model

    columns = _probe_columns(columns, fractions, test_fraction)
    model, _enc, _dec, record = load_image_text_model(run, device)
    table = read_report_pairs(pairs, columns, skip_empty=skip_empty)
    train, test, classes = _split_labelled(table, columns.label, test_fraction, seed)
    size = record["plan"]["patch_size"][0]
    train_x = encoder_features(model, [p.image for p in train], size, progress=progress)
    test_x = encoder_features(model, [p.image for p in test], size, progress=progress)
    train_y, test_y = np.array([p.label for p in train]), np.array([p.label for p in test])
    scores = probe_scores(train_x, train_y, test_x, test_y, fractions, seed)
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


def _probe_columns(columns: ReportColumns | None, fractions: Sequence[float], test_fraction: float) -> ReportColumns:
    """The probe's columns (default: the label in ``finding``), once its arguments are known to be right."""
    from medalloy.data.reports import ReportColumns

    columns = ReportColumns(label="finding") if columns is None else columns
    if columns.label is None:
        raise MedalloyError("the linear probe needs a label column", fix="name it with --label-column (label= in ReportColumns)")
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0]
    if bad or not fractions:
        raise MedalloyError(f"label fractions must be in (0, 1], got {list(fractions)}", fix="give e.g. --fractions 0.01 0.1 1.0")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise MedalloyError(f"the held-out fraction must be in (0, 1), got {test_fraction!r}", fix="give e.g. --test-fraction 0.25")
    return columns


def _split_labelled(table: ReportTable, label: str, test_fraction: float, seed: int) -> tuple[list[ReportPair], list[ReportPair], list[str]]:
    """``(training pairs, held-out pairs, the training classes)`` of ``table`` split by patient; refuses
    an empty label, nothing held out and a single training class."""
    from medalloy.data.reports import split_by_patient

    unlabelled = next((p for p in table.pairs if p.label is None), None)
    if unlabelled is not None:
        raise MedalloyError(f"line {unlabelled.row}: empty label (column '{label}')", table.path, "fill in the class or remove the row")
    train, test = split_by_patient(table.pairs, test_fraction, seed)
    patients = sorted({p.patient for p in table.pairs})
    if not test:
        raise MedalloyError(f"{len(patients)} patient(s): none to hold out for testing", table.path, "give the pairs of two or more patients")
    classes = sorted({p.label for p in train})
    if len(classes) < 2:
        raise MedalloyError(
            f"the training patients' images all have the label {classes[0]!r}: nothing to tell apart", table.path, "give pairs of two or more classes"
        )
    return train, test, classes


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
    (:func:`~medalloy.engine.metrics.retrieval_recall` both ways); an impression identical to the
    pair's own (case and whitespace aside) counts as its own. Writes ``out`` (JSON) and returns what it holds.
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
