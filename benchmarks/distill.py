"""Relation-based distillation on the real data of ../shared/data: a tiny student against its teacher
and the baselines, on Dice, size, FLOPs and CPU latency per runtime.

    python -m benchmarks.distill [--data ../shared/data] [--teacher-steps 1500] [--steps 600]
                                 [--only polyp cxr] [--models teacher student_alone ...]
    python -m benchmarks.distill --measure      # then, on an idle machine: size, FLOPs, latency, int8

Domains (held-out cases as in benchmarks/experts.py: never used in training or model selection):
- ``polyp``: Kvasir + CVC in one dataset (two sources). Teacher: a medalloy expert trained on both
  centres (the experts benchmark's 128 px polyp plan); students distil it on both centres. Scored
  per source (``polyp/Kvasir``, ``polyp/CVC``). Unseen source: a teacher and students trained on
  Kvasir alone, scored on CVC (``Kvasir->CVC``).
- ``cxr``: JSRT (lung, heart). Teacher: the JSRT expert; students distil it on JSRT. Unseen source:
  the same models on Shenzhen's held-out radiographs (lung; ``JSRT->Shenzhen``).

Models: ``teacher`` (a medalloy expert, ``--teacher-steps`` steps) and the students (tiny,
~0.35 M parameters, ``--steps`` steps each, the same seed); fixed step counts, so the training
pass gives the same models however busy the machine is (the two domains may run side by side,
``--threads 1`` each). ``student_alone``, ``logit_kd`` and ``relation_kd`` are the recipe's default
student (``recipes/students.default_stem``: a stem of two at both domains' patches, the image's 2x2
pixel blocks folded into channels and the network from 1/4), so the unseen-source rows compare
like for like; ``student_alone_full``, ``logit_kd_full``, ``relation_kd_full`` the same at full
resolution (``--stem-depth 0``), ``relation_kd_stem`` with a stem of one (``--stem``); the issue's
baselines and ablations ``skd``, ``cwd``, ``relation_no_kernel`` and ``relation_no_affinity`` are
default students with unseen-source rows, ``skd_full``, ``cwd_full``, ``relation_no_kernel_full``
and ``relation_no_affinity_full`` the same at full resolution (in-domain only);
``relation_kd_x10`` and ``relation_kd_x30`` are ``relation_kd`` with its kernel and affinity terms
weighted 10 and 30 (1 by default), to be chosen between by the validation Dice each student records;
``relation_kd_cross`` and ``relation_kd_x10_cross`` add relations across the images of a batch (the
recipe's ``--losses relation_cross``), at weight 1 and 10.
Multi-source (chest X-ray): ``logit_kd_multi``, ``relation_kd_multi`` and ``relation_kd_x10_multi`` are
those rows trained from the JSRT teacher on JSRT's and Shenzhen's images at once (Shenzhen labels the
lung only: its lung labels train through the marginal loss, the heart comes from the teacher), scored
on both held-out sets.
Per model: Dice per task/source; then ``--measure`` (alone on the machine: it times) adds
parameters, ONNX file size, GFLOPs (PyTorch's FlopCounterMode) and latency at the plan's patch,
batch 1, median of 50 after 5 warm-up calls, with 2 threads: PyTorch eager fp32, bf16 autocast,
ONNX Runtime fp32 and int8 (static, calibrated on 32 training patches; the teacher's and the
relation student's int8 Dice too).

``--only DOMAIN`` / ``--models M ...`` rerun parts and merge them into the results. Writes
``benchmarks/results/distill.json`` and ``distill.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from benchmarks.common import PLAN_OPTIONS, dataset_path, predict_and_score, splits

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))

STUDENTS = {
    "student_alone": "student_alone", "logit_kd": "logit_kd", "relation_kd": "relation", "relation_kd_stem": "relation",
    "student_alone_full": "student_alone", "logit_kd_full": "logit_kd", "relation_kd_full": "relation",
    "skd": "skd", "cwd": "cwd", "relation_no_kernel": "relation_no_kernel", "relation_no_affinity": "relation_no_affinity",
    "skd_full": "skd", "cwd_full": "cwd", "relation_no_kernel_full": "relation_no_kernel", "relation_no_affinity_full": "relation_no_affinity",
}  # fmt: skip
# students whose stem is not the recipe's default (models/students.py): how many of the finest stages they drop
STEM = {
    "relation_kd_stem": 1, "student_alone_full": 0, "logit_kd_full": 0, "relation_kd_full": 0,
    "skd_full": 0, "cwd_full": 0, "relation_no_kernel_full": 0, "relation_no_affinity_full": 0,
}  # fmt: skip
# relation KD at the default student with the relation terms (kernel and affinity) weighted W
# instead of 1: at weight 1 they end ~20x below L_seg (0.02-0.04 vs ~0.65 on polyp), too small to
# steer the student; the weight is chosen by the students' validation Dice on the training source
RELATION_WEIGHTS = (10.0, 30.0)
WEIGHTS: dict[str, dict[str, float]] = {f"relation_kd_x{w:g}": {"kernel": w, "affinity": w} for w in RELATION_WEIGHTS}
STUDENTS.update({name: "relation" for name in WEIGHTS})
# relation KD with relations across images too (the recipe's losses "relation_cross": the affinity
# also over the positions of the whole batch, losses/affinity.py scope "batch"), at weight 1 and 10
CROSS: dict[str, dict[str, float]] = {"relation_kd_cross": {}, "relation_kd_x10_cross": {"kernel": 10.0, "affinity": 10.0, "cross": 10.0}}
STUDENTS.update({name: "relation_cross" for name in CROSS})
# multi-source (the issue's JSRT + Shenzhen): the domain's students trained on the images of several
# datasets at once, from the domain's teacher (Shenzhen labels the lung only: the recipe's marginal
# loss trains its lung, the teacher its heart), scored on each one's held-out cases; each row is the
# named single-source row's configuration with more images
MULTI_SOURCES = {"cxr": ["JSRT", "Shenzhen"]}
# the default student with a sub-pixel head (models/students.py, upsample "shuffle"): its logits
# leave the quarter-resolution network as K x 16 channels, unfolded to full resolution
SHUFFLE = {"student_alone_shuffle": "student_alone", "logit_kd_shuffle": "logit_kd", "relation_kd_shuffle": "relation"}
STUDENTS.update(SHUFFLE)
# the default student at a larger parameter budget: 500 k, a tenth of the 5.15 M teachers (the
# widest that keeps the >= 10x target)
BUDGET = {"relation_kd_500k": 500_000, "student_alone_500k": 500_000}
STUDENTS.update({"relation_kd_500k": "relation", "student_alone_500k": "student_alone"})
# the default students under the "strong" augmentation preset (data/transforms.py: every transform
# more often and wider, intensity above all: what differs between centres), the teacher seeing the
# same augmented patches: does relation KD gain more from it than its baselines on the unseen source?
AUGMENT = {"student_alone_aug": "student_alone", "logit_kd_aug": "logit_kd", "relation_kd_aug": "relation"}
STUDENTS.update(AUGMENT)
# the default student with depthwise-separable convolutions (models/students.py: wider filters
# within the same parameter budget), relation KD and its baselines: does the wider network pay in
# Dice or time, and does relation KD gain more from it than the baselines?
SEPARABLE = {"student_alone_sep": "student_alone", "logit_kd_sep": "logit_kd", "relation_kd_sep": "relation"}
STUDENTS.update(SEPARABLE)
MULTI = {"logit_kd_multi": "logit_kd", "relation_kd_multi": "relation_kd", "relation_kd_x10_multi": "relation_kd_x10"}
MODELS = ["teacher", *STUDENTS, *MULTI]
# relation KD at each student architecture, and the baselines it must beat at the same one
RELATION_VS_BASELINES = {
    "relation_kd": ("student_alone", "logit_kd"), "relation_kd_full": ("student_alone_full", "logit_kd_full"), "relation_kd_stem": (),
    "relation_kd_shuffle": ("student_alone_shuffle", "logit_kd_shuffle"), "relation_kd_500k": ("student_alone_500k",),
    **{name: ("student_alone", "logit_kd") for name in (*WEIGHTS, *CROSS)}, "relation_kd_aug": ("student_alone_aug", "logit_kd_aug"),
    "relation_kd_sep": ("student_alone_sep", "logit_kd_sep"),
}  # fmt: skip
# the students trained on one centre only, for the unseen-source row (the ones the targets compare)
UNSEEN_MODELS = ["teacher", "student_alone", "logit_kd", "relation_kd", *WEIGHTS, *CROSS, "skd", "cwd", "relation_no_kernel", "relation_no_affinity", "relation_kd_stem", "student_alone_full", "logit_kd_full", "relation_kd_full", *SHUFFLE, *BUDGET, *AUGMENT, *SEPARABLE]
# domain -> (members of the training set, per-source test sets {source: (experts-benchmark name, label names)}, unseen (train -> test))
DOMAINS: dict[str, dict[str, Any]] = {
    "polyp": {"train": ["Polyp-Kvasir", "Polyp-CVC"], "unseen_train": ["Polyp-Kvasir"], "unseen_test": "Polyp-CVC", "unseen_key": "Kvasir->CVC"},
    "cxr": {"train": ["JSRT"], "unseen_train": ["JSRT"], "unseen_test": "Shenzhen", "unseen_key": "JSRT->Shenzhen"},
}
LATENCY_RUNS, LATENCY_WARMUP = 50, 5
DOMAIN_NAMES = {"cxr": "chest X-ray"}  # how the markdown names a domain
# What the runs showed (rendered under "Notes"; measured, see docs/methods/distillation.md).
NOTES = [
    "Student width: the first pass (commit 4b4d65e) used filters doubling to 8x the base (6..48 at 224 px, 0.29 M, 0.65 "
    "GFLOPs); every JSRT student then scored heart Dice 0.000 (lung 0.95-0.96), with or without distillation. "
    "`benchmarks/probes.py width` (results/probes.json, the student alone, 120 steps): the 6..48 network predicts almost no "
    "heart until step ~100 and ends at loss 0.75, the 11..44 one at 0.28. Capped at 4x the base (11..44, 0.34 M, 1.67 GFLOPs; the paper's student: ~353 k, ~2.2 GFLOPs) "
    "every student learns the heart (0.905-0.928). That second pass (2026-12-02, commit 646dca1) is the `*_full` rows.",
    "2026-12-02 pass (commit 646dca1, full-resolution students; superseded by the stem of two below: 10.5x, met). "
    "Latency missed (1.6x, target 5x): FLOPs fall 3.3x (5.45 -> 1.67 GFLOPs) but time only 1.6x. A torch.profiler pass "
    "(`benchmarks/probes.py profile`, results/probes.json; bf16, batch 1, 224 px, one thread) puts 56 % of the relation "
    "student's CPU time in convolutions (7 points of it dispatch in `aten::_convolution`), 20 % in dtype and layout copies "
    "around them and 10 % in instance norms (teacher: 50 %, 30 %, 9 %): oneDNN's kernels run far below peak at 11-44 channels, so halving the FLOPs does not halve the time; ONNX Runtime does not beat bf16 autocast here (14.4 vs 11.3 ms) and "
    "int8 (static QDQ) gains nothing for the student (instance norms stay float, with quantize/dequantize pairs around "
    "every convolution) while it brings the teacher from 25.4 to 18.8 ms in ONNX Runtime, as fast as its bf16 (that "
    "pass's teacher times; the table's teacher row is the 2026-12-03 pass's, 34.5 -> 21.6 ms). Next: a "
    "stride-2 stem (the first stage at half resolution), fewer full-resolution operators, a separable student "
    "(`--separable`) measured.",
    "2026-12-02 pass (commit 646dca1, full-resolution students: the `*_full` rows, with that day's teachers; at the "
    "default student superseded by the three-seed rows below). In-domain, distillation at 400 student steps moves Dice little (students 0.738-0.761 mean against the teacher's 0.755; "
    "the plain student is at 97.7 %); relation KD reaches 100 % of the teacher, CWD 101 %, the relation ablations 98-99 %. "
    "On the unseen source relation KD is above logit KD and the student alone on both rows (JSRT->Shenzhen 0.686 vs 0.666 / "
    "0.620; Kvasir->CVC 0.487 vs 0.479 / 0.457). One seed: in-domain differences of ~0.01 are noise.",
    "Stem student (2026-12-03, `relation_kd_stem`: `--stem`, no full-resolution stage, 0.57 GFLOPs at 224 px): trained "
    "with a teacher retrained that day on another machine (same seed and steps, different thread count: JSRT heart "
    "0.938 / lung 0.975, where the other students' teacher had 0.928 / 0.975; its row in the table is the new one). "
    "JSRT: stem student 0.932 / 0.969 (99.4 % of its teacher), JSRT->Shenzhen 0.705 (relation KD 0.687, logit KD "
    "0.666); polyp (teachers retrained likewise, CVC 0.566 / Kvasir 0.553): 0.565 / 0.573, Kvasir->CVC 0.497 (relation KD "
    "0.487, logit KD 0.479); 100.3 % of the teacher over the four tasks. An earlier latency probe (`benchmarks/probes.py "
    "latency`) called it 5.7x faster than the teacher, but against the teacher's bf16 (36.1 ms there), not its int8 graph: "
    "in the `--measure` pass, each model in its fastest runtime, it is 2.2-3.3x (two passes on one machine: 6.5 and 9.7 ms "
    "in ONNX Runtime against the teacher's int8 21.4 / 21.6 ms; timings on this shared machine vary by up to ~50 % between "
    "passes, less within one).",
    "Stem of two (2026-12-03, `relation_kd_stem2`: `--stem-depth 2`): the image's 2x2 pixel blocks folded into channels "
    "(space-to-depth, lossless), the network strided from there, so it starts at 1/4 resolution (0.32 M parameters, 0.21 "
    "GFLOPs at 224 px; logits interpolated back). 400 relation-KD steps from the same teachers: JSRT heart / lung 0.928 / "
    "0.966, polyp CVC / Kvasir 0.538 / 0.577, 99.2 % of the teacher over the four tasks; 2.0 ms in ONNX Runtime against the "
    "teacher's 21.6 ms (int8), 10.5x, in the same `--measure` pass (polyp, 128 px: 1.1 vs 9.1 ms, 8.3x): the latency target "
    "is met by this student. Unseen source: JSRT->Shenzhen 0.708 (best of all students), Kvasir->CVC 0.472 (below logit KD's "
    "full-resolution student, 0.479, and relation KD's, 0.487: a 32 x 32 output map at 128 px loses small-polyp outlines; one "
    "seed). The rows of the other students keep the latencies of a 2026-12-02 `--measure` pass on a faster machine (their "
    "runs were not kept); the teacher's and the stem students' are from 2026-12-03.",
    "Default student, like for like (2026-12-04): `student_alone`, `logit_kd` and `relation_kd` are now the recipe's "
    "default student (stem of two) and were trained the same day from the same teachers (cxr's teacher reproduced the "
    "2026-12-03 one: heart / lung 0.938 / 0.975; polyp's, retrained, 0.574 / 0.551 where the earlier rows had 0.553 / "
    "0.566). The earlier full-resolution rows are renamed `*_full` (and keep that day's teachers). JSRT and "
    "JSRT->Shenzhen: three student seeds (`--student-seeds 0 1 2`); polyp: one. Relation KD keeps 98.4 % of the "
    "teacher's mean Dice, but is not above the student alone and logit KD on the unseen sources: JSRT->Shenzhen 0.716 vs "
    "0.719 / 0.722 (seeds spread 0.69-0.74 for each loss), Kvasir->CVC 0.470 vs 0.488 / 0.480 (one seed, that "
    "morning's polyp teacher; superseded by the three-seed polyp note below: 0.479 vs 0.481 / 0.466). The earlier "
    "`relation_kd_stem2` run of the same configuration scored JSRT->Shenzhen 0.708 where today's seed 0 scores 0.687 (the "
    "same teacher; other thread counts): single-seed unseen rows move by ~0.02-0.05. At a quarter resolution the student "
    "alone generalises as well as the distilled ones; the full-resolution students did show relation KD ahead "
    "(`relation_kd_full` 0.686 / 0.487 vs 0.666 / 0.479 and 0.620 / 0.457, one seed). The new `student_alone` and "
    "`logit_kd` rows have no latency of their own: the architecture is relation_kd's (2.0 ms, ONNX fp32).",
    "Polyp with three student seeds (2026-12-04, later: `--only polyp --models teacher student_alone logit_kd relation_kd "
    "--student-seeds 0 1 2 --teacher-steps 800 --steps 400 --threads 2`): the teachers retrained with two threads "
    "reproduce the 2026-12-03 ones (Kvasir / CVC 0.553 / 0.566; the one-thread retrain of the morning had 0.574 / 0.551), "
    "and the three default students were retrained from them, three seeds each. Kvasir->CVC: relation KD 0.479 (0.472 / "
    "0.490 / 0.475) vs the student alone 0.481 (0.473 / 0.490 / 0.480) and logit KD 0.466 (0.464 / 0.492 / 0.442): level "
    "with the student alone, above logit KD, all within the seeds' spread. In domain distillation pays on polyp: CVC "
    "0.530 relation KD and 0.538 logit KD against 0.495 for the student alone (Kvasir 0.563 / 0.568 / 0.544). So over "
    "three seeds on both unseen rows, relation KD at the default (quarter-resolution) student is level with training "
    "the student alone (JSRT->Shenzhen -0.003, Kvasir->CVC -0.002): the unseen-source target is missed by margins well "
    "inside the seeds' spread.",
    "int8 (2026-12-02 `--measure` pass, full-resolution students; the teachers' times in distill.json are the 2026-12-03 "
    "pass's: 34.5 -> 21.6 ms at 224 px, 12.9 -> 9.1 ms at 128 px): static QDQ, 32 calibration patches, changes Dice by at most 0.003 on every task; it speeds up the teachers in "
    "ONNX Runtime (25.4 -> 18.8 ms at 224 px, 9.0 -> 7.2 ms at 128 px) and not the students. At 128 px (polyp) the "
    "fastest teacher is 7.2 ms (ONNX int8) and the fastest student 4.6 ms (ONNX fp32): 1.5x.",
    "Relation-term weights (2026-12-05: `--models relation_kd_x10 relation_kd_x30` with the baselines, `--student-seeds 0 "
    "1 2 --teacher-steps 800 --steps 400 --threads 1`, polyp's baselines reused, chest X-ray's retrained with a retrained "
    "teacher that reproduced the earlier one to the fourth decimal, as did every student): at weight 1 the kernel and "
    "affinity terms end 20-30x below L_seg (polyp: 0.02-0.04 vs 0.65), so they barely steer the student. Weighted 10 and "
    "30, on chest X-rays they trade a little in-domain Dice for the unseen source: JSRT->Shenzhen 0.732 (x10) and 0.743 "
    "(x30, seeds 0.740-0.745, the tightest of any loss) against 0.719 alone and 0.722 logit KD, JSRT Dice 0.944 / 0.939 "
    "against 0.945. On polyp they cost both: Kvasir->CVC 0.471 / 0.465 against 0.479 at weight 1, validation 0.550 / "
    "0.533 against 0.565. Chosen per domain by the validation Dice on the training source (x10 for chest X-rays, 1 for "
    "polyp), relation KD is above both baselines on JSRT->Shenzhen (+0.010 over logit KD, inside the baselines' seed "
    "spread) and level on Kvasir->CVC (-0.002): the target is met on one of the two unseen rows.",
    "A converged polyp teacher (2026-12-05, `--only polyp --teacher-steps 3000 --steps 2000 --student-seeds 0 1 2 "
    "--models teacher student_alone logit_kd relation_kd --results benchmarks/results/distill_long`): the 800-step polyp "
    "teacher of the main table was undertrained (Kvasir / CVC 0.553 / 0.566; at 3,000 steps 0.781 / 0.770). Against the "
    "converged one, students of 2,000 steps keep 92.4 % (relation KD 0.716, logit KD 0.717, alone 0.671 vs 0.775): the "
    ">= 97 % target is missed on polyp; on Kvasir->CVC every student beats the teacher (0.561-0.595 vs 0.521), relation KD "
    "the lowest of the three. The chest X-ray teacher is near its ceiling at 800 steps (validation flat from step 400).",
    "Students as long as the converged teacher (2026-12-05, later; `benchmarks/results/distill_s4000`: `--only polyp "
    "--teacher-steps 3000 --steps 4000 --student-seeds 0 1 2 --models teacher student_alone logit_kd relation_kd`, the "
    "3,000-step teacher reused): at 2,000 steps the students' learning rate had decayed while their validation Dice still "
    "rose. A sub-pixel head (`relation_kd_shuffle`, `--upsample shuffle`) and a 500 k student (`relation_kd_500k`) at 2,000 "
    "steps did not help (mean 0.713 / 0.718 against 0.716, seed 0, results/distill_long). At 4,000 steps relation KD keeps "
    "98.9 % of the teacher (0.767 vs 0.775; logit KD 0.744, the student alone 0.739), 8.3x faster in the fastest runtimes "
    "(0.42 ms ONNX fp32 vs the teacher's 3.5 ms ONNX int8 at 128 px, a quiet machine), and on Kvasir->CVC is level with "
    "the student alone and above logit KD (0.604 vs 0.603 / 0.590; seeds 0.587-0.635, 0.550-0.637, 0.562-0.608: inside the spread).",
    "Chest X-rays at the same lengths (2026-12-05, later, same results folder: `--only cxr --teacher-steps 3000 --steps 4000 "
    "--student-seeds 0 1 2 --models teacher student_alone logit_kd relation_kd relation_kd_x10`, two passes side by side at one "
    "thread each, then `--measure --models teacher relation_kd` alone): the 3,000-step JSRT teacher scores heart / lung 0.945 / "
    "0.980 (800 steps: 0.938 / 0.975) and 0.753 on Shenzhen (800 steps: 0.787); every 4,000-step student reaches it on JSRT "
    "(0.943-0.947 / 0.977-0.978), so over both domains relation KD keeps 99.5 % of the teacher (logit KD 98.2 %, alone 97.8 %), "
    "19.1x faster in the fastest runtimes (1.4 ms ONNX int8 vs the teacher's 26.9 ms ONNX int8 at 224 px). JSRT->Shenzhen: "
    "relation KD 0.733 (seeds 0.727-0.737) above the student alone 0.708 (0.684-0.726), below logit KD 0.737 (0.715-0.755): "
    "level in truth; x10 0.742 (0.732-0.757) is above both but validation Dice does not choose it (0.959 for both weights). "
    "int8 moves no Dice of the teacher or relation KD by more than 0.008 (relation KD's Kvasir 0.777 -> 0.769).",
    "Relations across images (2026-12-05, later; same folder: `--only cxr --teacher-steps 3000 --steps 4000 --student-seeds "
    "0 1 2 --models relation_kd_cross` and `relation_kd_x10_cross`, two passes side by side at one thread): the recipe's "
    "`--losses relation_cross` adds the affinity over the batch's positions (16 an image, 192 a batch of 12; losses/"
    "affinity.py scope batch), after CIRKD and the journal title's 'cross-site relational'. JSRT->Shenzhen 0.738 at "
    "weight 1 (seeds 0.735-0.742, the tightest of any loss) against 0.737 logit KD (0.715-0.755) and 0.708 alone, 0.729 "
    "at x10 (0.725-0.733); in domain level (heart / lung 0.946 / 0.978). Validation Dice picks x10 cross (0.961 against "
    "0.958 at weight 1), whose unseen row is below logit KD: across-image relations narrow the seeds' spread but do not "
    "lift the mean beyond it; the unseen-source target stays missed on chest X-rays. Polyp not run (its two 3,000-step "
    "teachers' runs were not kept).",
    "The issue's baselines and ablations at the default student (2026-12-05, later; same folder, `--student-seeds 0` only: "
    "`--models skd cwd` and `relation_no_kernel relation_no_affinity`, two passes side by side): JSRT heart / lung "
    "0.945-0.946 / 0.977-0.978 for all four, like every default student; JSRT->Shenzhen SKD 0.732, CWD 0.745, relation "
    "without kernel 0.737, without affinity 0.715 (seed 0 of relation KD 0.727, logit KD 0.715, alone 0.684; seeds of one "
    "loss spread by up to 0.04): no ordering beyond the spread. Polyp not run.",
    "Stronger augmentation (2026-12-05, later; same folder: `--only cxr --teacher-steps 3000 --steps 4000 --models "
    "relation_kd_aug` and `logit_kd_aug`, `--student-seeds 0 1 2` then `3 4`, two passes side by side at one thread, then "
    "`--student-seeds 0 1 2 3 4 --reuse-students` to score all five; `student_alone_aug` likewise, seeds 0-2 alone at two threads): "
    "the `*_aug` rows train under the recipe's `augment: strong` preset (data/transforms.py: affine, contrast and brightness "
    "at p 0.5, wider scale and gamma), the teacher seeing the same augmented patches. In domain level (heart / lung "
    "0.944-0.946 / 0.976-0.977). JSRT->Shenzhen: relation KD 0.758 (seeds 0.744-0.782) against logit KD 0.751 (0.742-0.774) "
    "and the student alone 0.721 (0.708-0.741); relation KD above logit KD on each of the five seeds "
    "(+0.015, +0.005, +0.008, +0.001, +0.008; the same seed draws the same initial weights and batches) and above the "
    "student alone on each seed, its lowest seed above the student alone's highest. Both KD students now pass their teacher (0.753); over the seeds 0-2 "
    "that every row has, augmentation lifts the KD students (logit +0.019, relation +0.033) more than the student alone (+0.013). Polyp not run (its teachers' "
    "runs were not kept).",
    "Multi-source (2026-12-05): `*_multi` rows train on JSRT's and Shenzhen's images at once from the JSRT teacher; "
    "Shenzhen labels the lung only. First run (commit ac7daac) with Shenzhen taught through the teacher alone: Shenzhen "
    "lung 0.785-0.790 (teacher 0.787, JSRT-only students 0.716-0.732). With the recipe's default since, the marginal loss "
    "on Shenzhen's lung labels (`partial_labels: marginal`; the table): 0.820-0.833, above the teacher on every seed "
    "(0.809-0.834), JSRT 0.906-0.910 / 0.954-0.956 against the single-source rows' 0.925-0.926 / 0.964.",
    "2026-12-06: the issue's baselines and ablations under their own keys at the default student (`skd`, `cwd`, "
    "`relation_no_kernel`, `relation_no_affinity`; chest X-ray, seeds 0-2, `--only cxr --models teacher skd cwd "
    "relation_no_kernel relation_no_affinity --student-seeds 0 1 2`; the 800-step teacher retrained from scratch "
    "gave the same Dice to 4 decimals, so every row shares one teacher). In domain the seven default students are within "
    "0.004 (0.942-0.946); on Shenzhen (unseen) CWD 0.729 and relation KD without its kernel term 0.724 are above "
    "relation KD (0.716), relation KD without its affinity term lowest (0.713); the order hints that the affinity term "
    "matters more than the kernel term, but every difference is inside the seeds' spread "
    "(0.69-0.74). Polyp likewise (same day, later: `--only polyp --models teacher skd cwd relation_no_kernel "
    "relation_no_affinity --student-seeds 0 1 2 --teacher-steps 800 --steps 400 --threads 2 --reuse-students`; the "
    "teacher retrained at two threads reproduced Kvasir / CVC 0.553 / 0.566, the Kvasir-only one its CVC 0.484, so the "
    "polyp rows share the teachers of student_alone, logit_kd and relation_kd; a first pass whose teacher had trained "
    "at one thread, 0.574 / 0.551, was set aside). In domain the four are above the student alone on CVC "
    "(0.542-0.553 vs 0.495; Kvasir 0.555-0.574 vs 0.544). Kvasir->CVC: relation KD 0.479 above SKD 0.478, CWD 0.473 "
    "and both ablations (without kernel 0.471, without affinity 0.465), the student alone 0.481 highest; every seed "
    "within 0.44-0.49. Of the seven default students, without kernel is second on JSRT->Shenzhen and fifth on "
    "Kvasir->CVC; without affinity is last on both (on polyp 0.001 below logit KD): a hint that the affinity term "
    "carries more than the kernel term, every gap inside the seeds' spread.",
    "Depthwise-separable students (2026-12-06, later: `--only cxr` then `--only polyp`, `--models relation_kd_sep "
    "student_alone_sep logit_kd_sep --student-seeds 0 1 2 --teacher-steps 800 --steps 400 --threads 2 "
    "--reuse-students`, the same teachers): `--separable` at the default stem buys 38..152 channels for 16..64 in "
    "the same budget (0.35 M parameters, 0.19 GFLOPs at 224 px). Relation KD is above the separable student alone on "
    "both unseen rows on every seed (JSRT->Shenzhen 0.748 vs 0.740, +0.007 / +0.007 / +0.011; Kvasir->CVC 0.478 vs "
    "0.457, +0.021 / +0.035 / +0.009) and above separable logit KD on JSRT->Shenzhen (0.739; 2 of 3 seeds), below it "
    "on Kvasir->CVC (0.482, -0.003): the unseen-source target is met on three of its four comparisons at this "
    "student, where the plain default student met one. In domain the separable students reach 98.8-99.7 % of the "
    "teacher (relation KD 0.754 against the plain one's 0.746); on JSRT->Shenzhen every separable row is 0.017-0.032 "
    "above its plain row, on Kvasir->CVC only logit KD gains (+0.016; alone -0.025, relation KD level). The cost is time: `benchmarks/probes.py latency` (results/probes_2026-12-06, one pass, "
    "untrained networks, 224 px, 2 threads) times the separable default student at 2.97 ms in ONNX Runtime against "
    "1.81 ms for the plain one (fewer FLOPs but twice the convolutions, the depthwise ones memory-bound; not profiled), 8.9x faster than the teacher's fastest runtime in that pass (bf16 26.5 ms; the probe has no int8) "
    "against 14.7x. Their rows are not in a `--measure` pass (the plain students' runs are gone, and timings of "
    "different passes do not compare on this machine).",
]


def log(msg: str) -> None:
    print(f"[distill] {msg}", flush=True)


def source_of(name: str) -> str:
    return name.split("-")[-1]


def union_split(members: list[str], data: Path, work: Path, seed: int) -> dict[str, list[str]]:
    parts = [splits(m, dataset_path(m, data, work), seed) for m in members]
    return {k: [c for p in parts for c in p[k]] for k in ("train", "val", "test")}


def score(model_path: Path, test: str, data: Path, work: Path, key: str, seed: int, labels: dict[str, int] | None = None) -> dict[str, float]:
    """Dice per label of ``model_path`` (run folder or .onnx) on the held-out cases of ``test``."""
    from medalloy.data.dataset import RawDataset

    ds_path = dataset_path(test, data, work)
    ids = splits(test, ds_path, seed)["test"]
    fg = {k: v for k, v in RawDataset(ds_path).spec.labels.items() if v}
    keep = {k: v for k, v in fg.items() if labels is None or labels.get(k) == v}
    scores, _ = predict_and_score(model_path, ds_path, ids, keep, key, work)
    return {label: s["dice"] for label, s in scores.items()}


def finished(run: Path) -> bool:
    path = run / "run.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("status") == "done"


def train_teacher(domain: str, members: list[str], data: Path, work: Path, steps: int, seed: int, tag: str) -> Path:
    """The domain's teacher (an expert of ``steps`` steps); a finished run of it is reused (delete it to retrain)."""
    from medalloy.data.dataset import RawDataset
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset
    from medalloy.recipes.expert import train_expert

    ds_path = dataset_path(members[0], data, work)
    split = union_split(members, data, work, seed)
    ds = RawDataset(ds_path)
    plan = plan_dataset(ds, fingerprint(ds, progress=False), **PLAN_OPTIONS.get(members[0], {}))
    run = work / "runs" / domain / f"teacher{tag}"
    if finished(run) and json.loads((run / "run.json").read_text(encoding="utf-8")).get("steps") == steps:
        log(f"{domain} teacher{tag}: reusing {run}")
        return run
    log(f"{domain} teacher{tag}: expert on {', '.join(members)} ({len(split['train'])} cases), patch {plan.patch_size}, {steps} steps")
    train_expert(
        ds_path, run, plan=plan, split={"train": split["train"], "val": split["val"]}, overwrite=True, progress=sys.stderr.isatty(),
        steps=steps, val_every=max(100, steps // 4), seed=seed,
    )  # fmt: skip
    return run


def train_student(domain: str, model: str, members: list[str], teacher: Path, data: Path, work: Path, steps: int, seed: int, tag: str, student_seed: int, reuse: bool = False) -> tuple[Path, dict[str, Any]]:
    """One student; ``seed`` picks the split (as for the teacher), ``student_seed`` its training
    (initialisation, batches): one run folder per student seed. ``reuse``: a finished run of the same
    steps is scored, not retrained."""
    from medalloy.data.dataset import RawDataset
    from medalloy.recipes.distill import DistillConfig, DistillWeights, train_distill

    paths = list(dict.fromkeys(dataset_path(m, data, work) for m in members))  # polyp's two centres share one dataset
    if len(paths) == 1:
        dataset: Path | list[Path] = paths[0]
        union = union_split(members, data, work, seed)
        split: dict[str, Any] = {"train": union["train"], "val": union["val"]}
    else:  # several datasets: the recipe takes a split per dataset
        dataset = paths
        split = {RawDataset(p).name: {k: v for k, v in splits(m, p, seed).items() if k != "test"} for m, p in zip(members, paths)}
    run = work / "runs" / domain / f"{model}{tag}{f'-seed{student_seed}' if student_seed != seed else ''}"
    if reuse and finished(run) and json.loads((run / "run.json").read_text(encoding="utf-8")).get("steps") == steps:
        log(f"{domain} {run.name}: reusing {run}")
        return run, json.loads((run / "run.json").read_text(encoding="utf-8"))
    log(f"{domain} {run.name}: {steps} steps on {', '.join(members)}")
    base = MULTI.get(model, model)
    weights = {**WEIGHTS, **CROSS}.get(base)
    config = DistillConfig(weights=DistillWeights(**(weights or {})), augment="strong" if base in AUGMENT else "default")
    res = train_distill(
        dataset, teacher, run, config, losses=STUDENTS[base], student=BUDGET.get(base, "tiny"), separable=base in SEPARABLE, stem=STEM.get(base), upsample="shuffle" if base in SHUFFLE else None, split=split,
        overwrite=True, progress=sys.stderr.isatty(), steps=steps, val_every=max(100, steps // 4), seed=student_seed,
    )  # fmt: skip
    return run, res


def mean_dice(per_seed: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([d[k] for d in per_seed])), 4) for k in per_seed[0]}


def measure(run: Path, calibration: Path, work: Path, key: str) -> dict[str, Any]:
    """Parameters, ONNX size, GFLOPs and latency per runtime of a run's best model; the int8 graph's path."""
    import torch

    from medalloy.engine.latency import model_latency_ms
    from medalloy.export import export_onnx
    from medalloy.interop.onnx_runtime import load_onnx
    from medalloy.models.flops import forward_gflops
    from medalloy.models.unet import count_parameters
    from medalloy.predict import load_model

    torch.set_num_threads(2)
    model, plan, _ = load_model(run / "checkpoints" / "best.safetensors")
    shape = (plan.in_channels, *plan.patch_size)
    fp32, int8 = work / "onnx" / f"{key}.onnx", work / "onnx" / f"{key}.int8.onnx"
    export_onnx(run, fp32, overwrite=True)
    export_onnx(run, int8, overwrite=True, quantize="int8", calibration=calibration)
    latency = {
        "eager_fp32": model_latency_ms(model, shape, "fp32", LATENCY_RUNS, LATENCY_WARMUP),
        "bf16": model_latency_ms(model, shape, "bf16", LATENCY_RUNS, LATENCY_WARMUP),
        "onnx_fp32": model_latency_ms(load_onnx(fp32, threads=2)[0], shape, "fp32", LATENCY_RUNS, LATENCY_WARMUP),
        "onnx_int8": model_latency_ms(load_onnx(int8, threads=2)[0], shape, "fp32", LATENCY_RUNS, LATENCY_WARMUP),
    }
    return {
        "params": count_parameters(model), "size_mb": round(fp32.stat().st_size / 2**20, 3), "size_mb_int8": round(int8.stat().st_size / 2**20, 3),
        "gflops": round(forward_gflops(model, shape), 3), "patch": list(plan.patch_size),
        "latency_ms": {k: round(v, 2) for k, v in latency.items()}, "int8_graph": str(int8),
    }  # fmt: skip


def run_domain(domain: str, models: list[str], data: Path, work: Path, teacher_steps: int, steps: int, seed: int, student_seeds: list[int], reuse: bool = False) -> dict[str, Any]:
    """The domain's teacher and students (each student once per seed of ``student_seeds``: its Dice
    is the mean over them, ``dice_per_seed`` keeps each), then the unseen-source rows."""
    spec = DOMAINS[domain]
    members = spec["train"]
    out: dict[str, Any] = {"models": {}, "unseen_source": {}, "unseen_source_per_seed": {}}
    teacher = train_teacher(domain, members, data, work, teacher_steps, seed, "")
    runs: dict[str, list[Path]] = {}
    for model in [m for m in models if m not in MULTI]:
        if model == "teacher":
            trained = [(teacher, json.loads((teacher / "run.json").read_text(encoding="utf-8")))]
        else:
            trained = [train_student(domain, model, members, teacher, data, work, steps, seed, "", s, reuse) for s in student_seeds]
        runs[model] = [run for run, _ in trained]
        per_seed = []
        for run, _ in trained:
            dice = {}
            for member in members:
                for label, d in score(run, member, data, work, f"{domain}-{run.name}-{member}", seed).items():
                    dice[f"{label}/{source_of(member)}"] = d
            per_seed.append(dice)
        run, res = trained[0]
        entry: dict[str, Any] = {"run": str(run), "train_minutes": round(res["seconds"] / 60, 2), "steps": int(res["steps"]), "params": int(res["params"])}
        entry["dice"] = mean_dice(per_seed)
        best = [(r.get("best") or {}).get("value") for _, r in trained]
        if model != "teacher" and None not in best:  # what a user could choose a setting by: the best validation Dice on the training source
            entry["val_dice"] = round(float(np.mean(best)), 4)
        if model != "teacher" and len(student_seeds) > 1:
            entry["seeds"], entry["dice_per_seed"] = list(student_seeds), per_seed
        entry["dice_mean"] = round(float(np.mean(list(entry["dice"].values()))), 4)
        out["models"][model] = entry
        log(f"{domain} {model}: Dice {entry['dice']} params {entry['params']}")
    # unseen source: trained on one centre, scored on the other
    test = spec["unseen_test"]
    from medalloy.data.dataset import RawDataset

    shared = {k: v for k, v in RawDataset(dataset_path(test, data, work)).spec.labels.items() if v}
    tag = "-" + source_of(spec["unseen_train"][0])
    for model in [m for m in UNSEEN_MODELS if m in models]:
        if spec["unseen_train"] == members:  # the domain's own models were trained on one centre
            unseen_runs = runs[model]
        elif model == "teacher":
            unseen_runs = [train_teacher(domain, spec["unseen_train"], data, work, teacher_steps, seed, tag)]
        else:
            t = train_teacher(domain, spec["unseen_train"], data, work, teacher_steps, seed, tag)
            unseen_runs = [train_student(domain, model, spec["unseen_train"], t, data, work, steps, seed, tag, s, reuse)[0] for s in student_seeds]
        values = []
        for run in unseen_runs:
            dice = score(run, test, data, work, f"{domain}-unseen-{run.name}", seed, labels=shared)
            values.append(round(float(np.mean(list(dice.values()))), 4))
        out["unseen_source"][model] = {spec["unseen_key"]: round(float(np.mean(values)), 4)}
        if len(values) > 1:
            out["unseen_source_per_seed"][model] = {spec["unseen_key"]: values}
    sources = MULTI_SOURCES.get(domain)
    for model in [m for m in MULTI if m in models and sources]:
        per_seed = []
        for s in student_seeds:
            run, _ = train_student(domain, model, sources, teacher, data, work, steps, seed, "", s, reuse)
            dice = {}
            for member in sources:
                for label, d in score(run, member, data, work, f"{domain}-{run.name}-{member}", seed).items():
                    dice[f"{label}/{source_of(member)}"] = d
            per_seed.append(dice)
        out.setdefault("multi_source", {})[model] = {"trained_on": sources, "dice": mean_dice(per_seed), "seeds": list(student_seeds), "dice_per_seed": per_seed}
        log(f"{domain} {model}: Dice {out['multi_source'][model]['dice']}")
    return out


def measure_all(res: dict[str, Any], data: Path, work: Path, seed: int, domains: list[str], models: list[str]) -> None:
    """The timing pass (run alone): size, FLOPs, latency per runtime and int8 Dice of the trained models named."""
    for domain, v in res.get("domains", {}).items():
        if domain not in domains:
            continue
        members = DOMAINS[domain]["train"]
        calibration = dataset_path(members[0], data, work) / "imagesTr"
        for model, entry in v["models"].items():
            if model not in models:
                continue
            m = measure(Path(entry["run"]), calibration, work, f"{domain}-{model}")
            if model in ("teacher", *RELATION_VS_BASELINES):  # what int8 costs in Dice
                entry["dice_int8"] = {}
                for member in members:
                    for label, d in score(Path(m["int8_graph"]), member, data, work, f"{domain}-{model}-{member}-int8", seed).items():
                        entry["dice_int8"][f"{label}/{source_of(member)}"] = d
            m.pop("int8_graph")
            entry.update(m)
            entry.pop("shares_measures_of", None)
            log(f"{domain} {model}: params {entry['params']} GFLOPs {entry['gflops']} latency {entry['latency_ms']}")


# What --measure adds that depends on the architecture only (not on the weights: int8 Dice does)
ARCHITECTURE_MEASURES = ("size_mb", "size_mb_int8", "gflops", "patch", "latency_ms")


def merge(old: dict[str, Any], domain: str, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s models and unseen rows into ``old``'s domain; a retrained model of the same size
    keeps the previous --measure pass's architecture measures, and says so."""
    doms = old.get("domains", {})
    mine = doms.setdefault(domain, {"models": {}, "unseen_source": {}})
    for name, entry in new["models"].items():
        before = mine["models"].get(name, {})
        shared = "shares_measures_of" in before  # summarise() shares those afresh
        if "latency_ms" not in entry and "latency_ms" in before and before.get("params") == entry.get("params") and not shared:
            entry.update({k: before[k] for k in ARCHITECTURE_MEASURES if k in before})
            entry["measured"] = before.get("measured") or "an earlier --measure pass of the same architecture (the model was retrained since)"
    mine["models"].update(new["models"])
    mine["unseen_source"].update(new["unseen_source"])
    for name in new["unseen_source"]:  # a rerun with one seed drops an older per-seed list of the same model
        mine.setdefault("unseen_source_per_seed", {}).pop(name, None)
    mine.setdefault("unseen_source_per_seed", {}).update(new.get("unseen_source_per_seed", {}))
    if new.get("multi_source"):
        mine.setdefault("multi_source", {}).update(new["multi_source"])
    return {**old, "domains": doms}


def architecture(name: str, entry: dict[str, Any]) -> tuple[Any, ...]:
    """What fixes a row's network (so its size, FLOPs and time): loss and loss weights do not."""
    return ("teacher",) if name == "teacher" else ("student", STEM.get(name, "default"), name in SEPARABLE, entry.get("params"))


def share_architecture_measures(models: dict[str, dict[str, Any]]) -> None:
    """A row that --measure did not time takes the measures of a timed row of the same network (the
    students of one architecture trained with other losses), naming it, so every row carries its time."""
    timed = {architecture(n, e): n for n, e in models.items() if e.get("latency_ms") and "shares_measures_of" not in e}
    for name, entry in models.items():
        source = timed.get(architecture(name, entry))
        if (entry.get("latency_ms") is None or "shares_measures_of" in entry) and source is not None and source != name:
            entry.update({k: models[source][k] for k in ARCHITECTURE_MEASURES if k in models[source]})
            entry["shares_measures_of"] = source


def reference_domain(entries: dict[str, dict[str, Any]]) -> str:
    """Of a row's per-domain entries, the one whose size and latency it shows: the chest X-ray one
    (the issue's 224 px) where measured, else a measured one, else the chest X-ray or first one."""
    order = sorted(entries, key=lambda d: d != "cxr")
    return next((d for d in order if entries[d].get("latency_ms")), order[0])


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's shape: per model, Dice over every task/source of both domains; size and latency at
    224 px (the chest X-ray domain: the issue's reference size), else the other domain's."""
    doms = res["domains"]
    for v in doms.values():
        share_architecture_measures(v["models"])
    models: dict[str, Any] = {}
    for name in MODELS:
        entries = {d: v["models"][name] for d, v in doms.items() if name in v["models"]}
        if not entries:
            continue
        ref = entries[reference_domain(entries)]
        dice = {k: v for e in entries.values() for k, v in e["dice"].items()}
        models[name] = {
            "dice_mean": round(float(np.mean(list(dice.values()))), 4), "dice": dice,
            "params": ref["params"], "size_mb": ref.get("size_mb"), "gflops": ref.get("gflops"), "latency_ms": ref.get("latency_ms"),
        }  # fmt: skip
    unseen: dict[str, Any] = {}
    per_seed: dict[str, Any] = {}
    for v in doms.values():
        for name, rows in v["unseen_source"].items():
            unseen.setdefault(name, {}).update(rows)
        for name, rows in v.get("unseen_source_per_seed", {}).items():
            per_seed.setdefault(name, {}).update(rows)
    return {**res, "models": models, "unseen_source": unseen, "unseen_source_per_seed": per_seed}


def fastest(lat: dict[str, float]) -> tuple[str, float]:
    k = min((k for k, v in lat.items() if v is not None), key=lambda k: lat[k])
    return k, lat[k]


def rerun_command(res: dict[str, Any], results: Path | None = None) -> str:
    """The command line of the settings ``res`` records (step counts, seeds) writing into
    ``results``, and where the rows' student seeds differ, that they are per row in the JSON."""
    if "steps" not in res or "teacher_steps" not in res:
        return "`python -m benchmarks.distill`"
    cmd = ["python -m benchmarks.distill", f"--teacher-steps {res['teacher_steps']}", f"--steps {res['steps']}"]
    if res.get("seed", 0):
        cmd.append(f"--seed {res['seed']}")
    seed = res.get("seed", 0)
    student_seeds = {tuple(m.get("seeds") or [seed]) for v in res.get("domains", {}).values() for n, m in v["models"].items() if n != "teacher"}
    if len(student_seeds) == 1 and len(only := next(iter(student_seeds))) > 1:
        cmd.append("--student-seeds " + " ".join(map(str, only)))
    if results is not None and results.resolve() != RESULTS.resolve():
        where = results.resolve()
        cmd.append(f"--results {where.relative_to(HERE.parent) if where.is_relative_to(HERE.parent) else where}")
    tail = " (each row's student seeds: `seeds` in distill.json)" if len(student_seeds) > 1 else ""
    return f"`{' '.join(cmd)}`{tail}"


def markdown(res: dict[str, Any], results: Path | None = None) -> str:
    models, unseen = res["models"], res["unseen_source"]
    keys = sorted({k for m in models.values() for k in m["dice"]})
    lines = [
        "# Distillation: a tiny student against its teacher",
        "",
        f"Teacher: a medalloy expert per domain ({res['teacher_steps']} steps); students: {res['steps']} steps each, tiny "
        "(~0.35 M parameters). Held-out cases of the experts benchmark. Latency: batch 1 at the plan's patch, median of "
        f"{LATENCY_RUNS} calls after {LATENCY_WARMUP} warm-up, 2 threads; size = the fp32 ONNX file. Rerun: {rerun_command(res, results)}.",
        "",
        "| model | " + " | ".join(keys) + " | mean | params | MB | GFLOPs | eager fp32 ms | bf16 ms | ONNX fp32 ms | ONNX int8 ms |",
        "|---|" + "---|" * (len(keys) + 8),
    ]
    for name, m in models.items():
        lat = m["latency_ms"] or {}
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731  (not measured yet: --measure)
        lines.append(
            f"| {name} | " + " | ".join(f"{m['dice'][k]:.3f}" if k in m["dice"] else "-" for k in keys) + f" | {m['dice_mean']:.3f}{'' if len(m['dice']) == len(keys) else '*'} | {m['params']:,} | "
            f"{fmt(m['size_mb'], '.2f')} | {fmt(m['gflops'], '.2f')} | " + " | ".join(fmt(lat.get(k), ".1f") for k in ("eager_fp32", "bf16", "onnx_fp32", "onnx_int8")) + " |"
        )
    doms = res.get("domains", {})
    teachers = {d: v["models"]["teacher"] for d, v in doms.items() if "teacher" in v["models"]}
    shown = reference_domain(teachers) if teachers else "cxr"  # the domain summarise() takes sizes and latencies from
    patch = next((m["patch"] for m in doms.get(shown, {}).get("models", {}).values() if m.get("patch")), None)
    at = f" ({' x '.join(map(str, patch))})" if patch else ""
    lines += ["", f"Sizes and latencies are the {DOMAIN_NAMES.get(shown, shown)} domain's{at}; per domain in `distill.json`."]
    if any(len(m["dice"]) < len(keys) for m in models.values()):
        lines.append("\\* the mean over the tasks of the domains the model was trained in (- : not trained there).")
    shared: dict[str, list[str]] = {}
    for v in res["domains"].values():
        for name, m in v["models"].items():
            if "shares_measures_of" in m and name not in shared.get(m["shares_measures_of"], []):
                shared.setdefault(m["shares_measures_of"], []).append(name)
    for source, names in shared.items():
        lines.append(f"{', '.join(names)}: {source}'s network with other losses, so {source}'s size, FLOPs and times (timed once).")
    lines.append("")
    if unseen:
        cols = sorted({k for v in unseen.values() for k in v})
        lines += ["## Unseen source (trained on one centre, scored on the other)", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        seeds = res.get("unseen_source_per_seed", {})

        def cell(name: str, c: str) -> str:
            row, each = unseen[name], seeds.get(name, {}).get(c)
            if c not in row:
                return ""
            return f"{row[c]:.3f}" + (f" ({' / '.join(f'{v:.3f}' for v in each)})" if each else "")

        for name in unseen:
            lines.append(f"| {name} | " + " | ".join(cell(name, c) for c in cols) + " |")
        if seeds:
            lines += ["", "A student's row with seeds in brackets: the mean over its training seeds, then each seed's (splits and teacher fixed)."]
        lines.append("")
    lines += multi_source_lines(res)
    val = {d: {name: m["val_dice"] for name, m in v["models"].items() if "val_dice" in m} for d, v in res["domains"].items()}
    if any(val.values()):
        doms = [d for d in val if val[d]]
        lines += [
            "## Validation Dice on the training sources (what a setting is chosen by)", "",
            "| model | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms),
        ]  # fmt: skip
        for name in [n for n in MODELS if any(n in val[d] for d in doms)]:
            lines.append(f"| {name} | " + " | ".join(f"{val[d][name]:.3f}" if name in val[d] else "" for d in doms) + " |")
        lines += ["", "The best checkpoint's validation Dice (the held-out cases are not used), mean over the student's seeds.", ""]
    int8 = [(d, name, m) for d, v in res["domains"].items() for name, m in v["models"].items() if "dice_int8" in m]
    if int8:
        lines += ["## int8 (ONNX Runtime static quantization) vs fp32 Dice", "", "| domain | model | task/source | fp32 | int8 |", "|---|---|---|---|---|"]
        for d, name, m in int8:
            for k, v in m["dice_int8"].items():
                lines.append(f"| {d} | {name} | {k} | {m['dice'][k]:.3f} | {v:.3f} |")
        lines.append("")
    lines += ["## Targets", ""] + targets(res) + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def single_source_scores(v: dict[str, Any], domain: str, name: str, cols: list[str]) -> dict[str, float]:
    """A single-source row's Dice per column: its own, and its unseen-source score for the other
    dataset's column where it has one (the unseen row is the mean over the labels both datasets share)."""
    spec = DOMAINS[domain]
    dice = dict(v["models"].get(name, {}).get("dice", {}))
    row = v["unseen_source"].get(name, {}).get(spec["unseen_key"])
    other = [c for c in cols if c.endswith("/" + source_of(spec["unseen_test"]))]
    if row is not None and len(other) == 1:
        dice[other[0]] = row
    return dice


def multi_source_lines(res: dict[str, Any]) -> list[str]:
    """Per domain with multi-source students: each beside its single-source row (whose score on the
    other dataset is its unseen-source row) and the teacher."""
    out = []
    for domain, v in res.get("domains", {}).items():
        multi = v.get("multi_source") or {}
        if not multi:
            continue
        spec = DOMAINS[domain]
        cols = sorted({k for m in multi.values() for k in m["dice"]})
        lines = [
            f"## Multi-source students ({' + '.join(MULTI_SOURCES[domain])} images)", "",
            "| model | trained on | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols),
        ]  # fmt: skip
        for name in ["teacher", *dict.fromkeys(MULTI[m] for m in multi)]:
            if name in v["models"]:
                d = single_source_scores(v, domain, name, cols)
                lines.append(f"| {name} | {' + '.join(spec['unseen_train'])} | " + " | ".join(f"{d[c]:.3f}" if c in d else "" for c in cols) + " |")
        for name, m in multi.items():
            lines.append(f"| {name} | {' + '.join(m['trained_on'])} | " + " | ".join(f"{m['dice'][c]:.3f}" if c in m["dice"] else "" for c in cols) + " |")
        lines += [
            "", f"A `*_multi` row: the named row's loss and weights, trained from the same teacher on the images of "
            f"{' and '.join(MULTI_SOURCES[domain])} at once (a dataset that labels only some of the teacher's classes trains those through "
            "the marginal loss, the recipe's default `partial_labels: marginal`), mean over its seeds. Single-source rows on the other dataset: their unseen-source score.", "",
        ]  # fmt: skip
        out += lines
    return out


def targets(res: dict[str, Any]) -> list[str]:
    models, unseen = res["models"], res["unseen_source"]
    if "teacher" not in models or "relation_kd" not in models:
        return ["- not measured yet (teacher and relation_kd needed)"]
    t, s = models["teacher"], models["relation_kd"]
    out = []
    ratio = t["params"] / s["params"]
    for name in RELATION_VS_BASELINES:
        if name not in models:
            continue
        s = models[name]
        keys = [k for k in s["dice"] if k in t["dice"]]  # the tasks it was trained for (it may cover one domain only)
        keep = float(np.mean([s["dice"][k] for k in keys])) / max(float(np.mean([t["dice"][k] for k in keys])), 1e-9)
        label = "relation KD" if name == "relation_kd" else name
        out.append(f"- {label} keeps {100 * keep:.1f} % of the teacher's mean Dice (target >= 97 %): {'met' if keep >= 0.97 else '**missed**'}")
        if name == "relation_kd":
            out.append(f"- {ratio:.1f}x fewer parameters (target >= 10x): {'met' if ratio >= 10 else '**missed**'}")
        if not t["latency_ms"] or not s["latency_ms"]:
            out.append(f"- latency of {name}: not measured yet (`--measure`)")
        else:
            (tk, tv), (sk, sv) = fastest(t["latency_ms"]), fastest(s["latency_ms"])
            speed = tv / sv
            out.append(f"- latency of {name}, each in its fastest runtime: teacher {tv:.1f} ms ({tk}), student {sv:.1f} ms ({sk}): {speed:.1f}x (target >= 5x): {'met' if speed >= 5 else '**missed**'}")
    for name, base in [(n, b) for n, bases in RELATION_VS_BASELINES.items() for b in bases]:
        if name in unseen and base in unseen:
            for k, v in unseen[name].items():
                b = unseen[base].get(k)
                if b is not None:
                    diffs = paired_differences(res, name, base, k)
                    pairs = "" if diffs is None else f" (paired by seed: {paired_summary(diffs)})"
                    out.append(f"- unseen source {k}: {name.replace('_kd', ' KD').replace('_', ' ')} {v:.3f} vs {base} {b:.3f}: {'met' if v > b else '**missed**'}{pairs}")
    out += chosen_by_validation(res)
    return out


def paired_differences(res: dict[str, Any], name: str, base: str, key: str) -> list[float] | None:
    """``name`` minus ``base`` on the unseen-source row ``key``, seed by seed: only where both rows
    were trained with the same student seeds (a seed fixes initialisation and batches, so the pair
    shares everything but the loss); None where they were not, or one of them has a single seed."""
    for v in res.get("domains", {}).values():
        a = v.get("unseen_source_per_seed", {}).get(name, {}).get(key)
        b = v.get("unseen_source_per_seed", {}).get(base, {}).get(key)
        seeds_a, seeds_b = v["models"].get(name, {}).get("seeds"), v["models"].get(base, {}).get("seeds")
        if a and b and seeds_a and seeds_a == seeds_b and len(a) == len(b) == len(seeds_a):
            return [round(x - y, 4) for x, y in zip(a, b)]
    return None


def paired_summary(diffs: list[float]) -> str:
    """A pair list as the tables show it, to 0.001: "+0.015 / +0.000 / -0.002; higher on 1, level on 1
    of 3, mean +0.004" (counted as shown, so a pair shown +0.000 is level, not higher)."""
    shown = [round(d, 3) + 0.0 for d in diffs]  # + 0.0: no "-0.000"
    higher, level = sum(d > 0 for d in shown), sum(d == 0 for d in shown)
    counts = f"higher on {higher}" + (f", level on {level}" if level else "") + f" of {len(diffs)}"
    return " / ".join(f"{d:+.3f}" for d in shown) + f"; {counts}, mean {round(float(np.mean(diffs)), 3) + 0.0:+.3f}"


def chosen_by_validation(res: dict[str, Any]) -> list[str]:
    """Per domain, the relation-KD weight a user would pick (best validation Dice on the training
    source, among ``relation_kd``, the ``WEIGHTS`` and the ``CROSS`` rows) and its unseen-source row against the baselines."""
    out = []
    for domain, v in res.get("domains", {}).items():
        models, unseen = v["models"], v["unseen_source"]
        options = [n for n in ("relation_kd", *WEIGHTS, *CROSS) if "val_dice" in models.get(n, {}) and n in unseen]
        if len(options) < 2 or not all(b in unseen for b in ("student_alone", "logit_kd")):
            continue
        best = max(options, key=lambda n: models[n]["val_dice"])
        key = DOMAINS[domain]["unseen_key"]
        x, a, b = unseen[best][key], unseen["student_alone"][key], unseen["logit_kd"][key]
        out.append(
            f"- unseen source {key}, relation KD in the setting chosen by validation Dice ({best}, {models[best]['val_dice']:.3f}): "
            f"{x:.3f} vs student_alone {a:.3f} / logit_kd {b:.3f}: {'met' if x > max(a, b) else '**missed**'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-distill")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training pass (1 when two passes run side by side)")
    p.add_argument("--measure", action="store_true", help="the timing pass over the trained models (run alone)")
    p.add_argument("--report", action="store_true", help="only rewrite distill.md from distill.json (e.g. after editing the notes)")
    p.add_argument("--only", nargs="*", default=list(DOMAINS), choices=list(DOMAINS))
    p.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    p.add_argument("--seed", type=int, default=0, help="the splits' and the teachers' seed")
    p.add_argument("--reuse-students", action="store_true", help="score finished student runs of the same steps instead of retraining them (after a code change, do not)")
    p.add_argument("--student-seeds", type=int, nargs="*", default=None, help="train each student once per seed and report the mean (default: --seed only)")
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if not a.data.is_dir():
        print(f"distill.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    import torch

    path = a.results / "distill.json"

    def save(res: dict[str, Any]) -> dict[str, Any]:
        res = summarise(res)
        a.results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        (a.results / "distill.md").write_text(markdown(res, a.results), encoding="utf-8")
        return res

    if a.report:
        save(json.loads(path.read_text(encoding="utf-8")))
        return 0
    if a.measure:
        if not path.exists():
            print(f"distill.py: {path} not found; run the training pass first", file=sys.stderr)
            return 1
        torch.set_num_threads(2)
        res = json.loads(path.read_text(encoding="utf-8"))
        measure_all(res, a.data, a.work, res.get("seed", 0), a.only, a.models)
        fresh = json.loads(path.read_text(encoding="utf-8"))  # a training pass of another domain may have written meanwhile
        for domain in a.only:
            if domain in res.get("domains", {}):
                fresh.setdefault("domains", {})[domain] = res["domains"][domain]
        res = fresh
        save(res)
        log(f"wrote {path}")
        return 0
    torch.set_num_threads(a.threads)
    for domain in a.only:
        new = run_domain(domain, a.models, a.data, a.work, a.teacher_steps, a.steps, a.seed, a.student_seeds or [a.seed], a.reuse_students)
        # two passes may run side by side (one domain each): read what the other wrote just before merging
        res = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if res and (res.get("steps"), res.get("teacher_steps")) != (a.steps, a.teacher_steps):
            print(f"distill.py: {path} was made with other settings; move it away or use --steps {res.get('steps')} --teacher-steps {res.get('teacher_steps')}", file=sys.stderr)
            return 1
        res.update({"steps": a.steps, "teacher_steps": a.teacher_steps, "seed": a.seed})
        save(merge(res, domain, new))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
