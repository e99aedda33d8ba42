"""benchmarks/distill.py: the relation-KD weight is chosen by validation Dice, never by the test rows."""

from __future__ import annotations

import json

import pytest

from benchmarks import distill as bench


def _domain(val: dict[str, float], unseen: dict[str, float]) -> dict:
    return {
        "models": {name: {"val_dice": v} for name, v in val.items()},
        "unseen_source": {name: {"JSRT->Shenzhen": v} for name, v in unseen.items()},
    }


def test_chosen_by_validation_picks_the_best_validation_not_the_best_test() -> None:
    # x30 has the best unseen row but not the best validation Dice: x10 must be the one reported
    dom = _domain(
        {"student_alone": 0.94, "logit_kd": 0.94, "relation_kd": 0.941, "relation_kd_x10": 0.942, "relation_kd_x30": 0.935},
        {"student_alone": 0.719, "logit_kd": 0.722, "relation_kd": 0.716, "relation_kd_x10": 0.732, "relation_kd_x30": 0.743},
    )
    (line,) = bench.chosen_by_validation({"domains": {"cxr": dom}})
    assert "(relation_kd_x10, 0.942): 0.732 vs student_alone 0.719 / logit_kd 0.722: met" in line


def test_chosen_by_validation_misses_when_a_baseline_is_as_good() -> None:
    dom = _domain(
        {"relation_kd": 0.565, "relation_kd_x10": 0.55},
        {"student_alone": 0.481, "logit_kd": 0.466, "relation_kd": 0.479, "relation_kd_x10": 0.471},
    )
    dom["unseen_source"] = {k: {"Kvasir->CVC": v["JSRT->Shenzhen"]} for k, v in dom["unseen_source"].items()}
    (line,) = bench.chosen_by_validation({"domains": {"polyp": dom}})
    assert "(relation_kd, 0.565): 0.479 vs student_alone 0.481" in line and line.endswith("**missed**")


def test_no_choice_without_two_weighted_rows_or_the_baselines() -> None:
    one = _domain({"relation_kd": 0.9}, {"relation_kd": 0.7, "student_alone": 0.6, "logit_kd": 0.6})
    no_base = _domain({"relation_kd": 0.9, "relation_kd_x10": 0.95}, {"relation_kd": 0.7, "relation_kd_x10": 0.8})
    assert bench.chosen_by_validation({"domains": {"cxr": one}}) == []
    assert bench.chosen_by_validation({"domains": {"cxr": no_base}}) == []


def test_rows_of_one_network_share_its_measures_and_name_the_timed_row() -> None:
    lat = {"eager_fp32": 5.9, "bf16": 5.3, "onnx_fp32": 2.0, "onnx_int8": 2.1}
    models = {
        "teacher": {"params": 5_000_000, "latency_ms": {"onnx_int8": 21.6}, "gflops": 5.4},
        "relation_kd": {"params": 317_555, "latency_ms": lat, "gflops": 0.21, "size_mb": 1.3},
        "student_alone": {"params": 317_555},
        "relation_kd_x10": {"params": 317_555},
        "relation_kd_stem": {"params": 317_555},  # another stem: another network, even at equal parameters
        "relation_kd_sep": {"params": 317_555},  # separable convolutions: another network likewise
        "student_alone_full": {"params": 339_661},
    }
    bench.share_architecture_measures(models)
    for name in ("student_alone", "relation_kd_x10"):
        assert models[name]["latency_ms"] == lat and models[name]["gflops"] == 0.21
        assert models[name]["shares_measures_of"] == "relation_kd"
    assert all("latency_ms" not in models[n] for n in ("relation_kd_stem", "relation_kd_sep", "student_alone_full"))
    assert "shares_measures_of" not in models["relation_kd"] and models["teacher"]["gflops"] == 5.4
    # a new timing of the source reaches the rows that share it
    models["relation_kd"]["latency_ms"] = {**lat, "onnx_fp32": 1.5}
    bench.share_architecture_measures(models)
    assert models["student_alone"]["latency_ms"]["onnx_fp32"] == 1.5


def test_multi_source_rows_sit_beside_their_single_source_row_scored_on_the_other_dataset() -> None:
    dom = {
        "models": {
            "teacher": {"dice": {"heart/JSRT": 0.938, "lung/JSRT": 0.975}},
            "relation_kd_x10": {"dice": {"heart/JSRT": 0.925, "lung/JSRT": 0.964}},
        },
        "unseen_source": {"teacher": {"JSRT->Shenzhen": 0.787}, "relation_kd_x10": {"JSRT->Shenzhen": 0.732}},
        "multi_source": {"relation_kd_x10_multi": {"trained_on": ["JSRT", "Shenzhen"], "dice": {"heart/JSRT": 0.92, "lung/JSRT": 0.96, "lung/Shenzhen": 0.81}}},
    }
    lines = bench.multi_source_lines({"domains": {"cxr": dom}})
    assert "| model | trained on | heart/JSRT | lung/JSRT | lung/Shenzhen |" in lines
    assert "| teacher | JSRT | 0.938 | 0.975 | 0.787 |" in lines
    assert "| relation_kd_x10 | JSRT | 0.925 | 0.964 | 0.732 |" in lines
    assert "| relation_kd_x10_multi | JSRT + Shenzhen | 0.920 | 0.960 | 0.810 |" in lines
    assert bench.multi_source_lines({"domains": {"polyp": {"models": {}, "unseen_source": {}}}}) == []


def test_merge_keeps_earlier_multi_source_rows_and_starts_a_fresh_results_file() -> None:
    first = bench.merge({}, "cxr", {"models": {}, "unseen_source": {}, "multi_source": {"logit_kd_multi": {"dice": {"lung/JSRT": 0.9}}}})
    both = bench.merge(first, "cxr", {"models": {}, "unseen_source": {}, "multi_source": {"relation_kd_multi": {"dice": {"lung/JSRT": 0.95}}}})
    assert set(both["domains"]["cxr"]["multi_source"]) == {"logit_kd_multi", "relation_kd_multi"}


def test_targets_compare_a_student_on_its_own_tasks_and_time_it_where_it_was_measured() -> None:
    # polyp finished and measured, cxr has only its teacher so far: the student keeps 0.76 / 0.78
    # of the polyp teacher (97.4 %), not of a mean that also holds the teacher's cxr tasks
    lat_t = {"eager_fp32": 20.0, "bf16": 15.0, "onnx_fp32": 12.0, "onnx_int8": 8.0}
    lat_s = {"eager_fp32": 2.0, "bf16": 2.0, "onnx_fp32": 1.0, "onnx_int8": 1.2}
    res = {
        "domains": {
            "polyp": {
                "models": {
                    "teacher": {"dice": {"polyp/Kvasir": 0.78}, "params": 5_000_000, "latency_ms": lat_t},
                    "relation_kd": {"dice": {"polyp/Kvasir": 0.76}, "params": 300_000, "latency_ms": lat_s},
                },
                "unseen_source": {},
            },
            "cxr": {"models": {"teacher": {"dice": {"lung/JSRT": 0.98}, "params": 5_000_001}}, "unseen_source": {}},
        }
    }
    lines = bench.targets(bench.summarise(res))
    assert lines[0] == "- relation KD keeps 97.4 % of the teacher's mean Dice (target >= 97 %): met"
    assert lines[1].startswith("- 16.7x fewer parameters")
    assert "teacher 8.0 ms (onnx_int8), student 1.0 ms (onnx_fp32): 8.0x (target >= 5x): met" in lines[2]


def test_train_student_asks_for_strong_augmentation_only_on_aug_rows_and_separable_only_on_sep_rows(monkeypatch, tmp_path) -> None:
    """train_distill is replaced by a recorder: what each row passes it (augmentation, weights, loss,
    --separable) is checked, not that any row trains."""
    from medalloy.data.transforms import AugmentConfig

    seen: dict[str, tuple] = {}

    def fake_train(dataset, teacher, run, config, **kw):
        seen[run.name] = (config, kw["losses"], kw["separable"])
        return {}

    monkeypatch.setattr("medalloy.recipes.distill.train_distill", fake_train)
    monkeypatch.setattr(bench, "dataset_path", lambda member, data, work: tmp_path / member)
    monkeypatch.setattr(bench, "union_split", lambda *a: {"train": ["a"], "val": ["b"]})
    for model in ("relation_kd_aug", "logit_kd_aug", "student_alone_aug", "relation_kd", "relation_kd_x10", *(n for n, a in bench.ARMS.items() if a.separable)):
        bench.train_student("cxr", model, ["JSRT"], tmp_path / "teacher", tmp_path, tmp_path, 10, 0, "", 0)
    strong, default = AugmentConfig.model_validate("strong"), AugmentConfig()
    assert strong != default and strong.p_contrast > default.p_contrast
    assert [seen[m][1] for m in ("relation_kd_aug", "logit_kd_aug", "student_alone_aug")] == ["relation", "logit_kd", "student_alone"]
    assert all(seen[m][0].augment == strong for m in ("relation_kd_aug", "logit_kd_aug", "student_alone_aug"))
    assert seen["relation_kd_aug"][0].weights.kernel == 1.0  # the plain relation row's weights
    assert seen["relation_kd"][0].augment == default and seen["relation_kd_x10"][0].augment == default
    assert seen["relation_kd_x10"][0].weights.kernel == 10.0
    # only the separable rows ask for separable convolutions, each with its plain row's loss
    assert sorted(m for m in seen if seen[m][2]) == ["logit_kd_sep", "relation_kd_sep", "student_alone_sep"]
    assert [seen[m][1] for m in ("student_alone_sep", "logit_kd_sep", "relation_kd_sep")] == ["student_alone", "logit_kd", "relation"]


def test_unseen_rows_are_paired_seed_by_seed_only_when_both_rows_share_their_seeds() -> None:
    # means alone (0.740 vs 0.730) hide that relation KD loses on seed 1; the pair shows it
    def domain(seeds_logit: list[int]) -> dict:
        return {
            "models": {
                "teacher": {"dice": {"lung/JSRT": 0.98}, "params": 5_000_000},
                "relation_kd": {"dice": {"lung/JSRT": 0.97}, "params": 300_000, "seeds": [0, 1, 2]},
                "logit_kd": {"dice": {"lung/JSRT": 0.97}, "params": 300_000, "seeds": seeds_logit},
            },
            "unseen_source": {"relation_kd": {"JSRT->Shenzhen": 0.74}, "logit_kd": {"JSRT->Shenzhen": 0.73}},
            "unseen_source_per_seed": {"relation_kd": {"JSRT->Shenzhen": [0.75, 0.71, 0.76]}, "logit_kd": {"JSRT->Shenzhen": [0.72, 0.73, 0.74]}},
        }

    line = next(x for x in bench.targets(bench.summarise({"domains": {"cxr": domain([0, 1, 2])}})) if "vs logit_kd" in x)
    assert line.endswith("met (paired by seed: +0.030 / -0.020 / +0.020; higher on 2 of 3, mean +0.010)")
    assert bench.paired_summary([0.01, 0.0002, -0.0003, -0.0098]) == "+0.010 / +0.000 / +0.000 / -0.010; higher on 1, level on 2 of 4, mean +0.000"
    # other seeds (or a single-seed row) cannot be paired: the line keeps the means only
    line = next(x for x in bench.targets(bench.summarise({"domains": {"cxr": domain([3, 4, 5])}})) if "vs logit_kd" in x)
    assert line.endswith(": met")
    assert bench.paired_differences(bench.summarise({"domains": {"cxr": domain([3, 4, 5])}}), "relation_kd", "logit_kd", "JSRT->Shenzhen") is None


def test_rerun_line_gives_the_settings_the_results_record() -> None:
    def res(seeds: dict[str, list[int] | None], seed: int = 0) -> dict:
        row = {"dice": {"lung/JSRT": 0.97}, "params": 300_000}
        models = {"teacher": dict(row), **{n: {**row, **({"seeds": s} if s else {})} for n, s in seeds.items()}}
        return {"steps": 4000, "teacher_steps": 3000, "seed": seed, "domains": {"cxr": {"models": models, "unseen_source": {}}}}

    other = bench.HERE / "results" / "archive" / "distill_s4000"
    one = bench.rerun_command(res({"relation_kd": [0, 1, 2], "logit_kd": [0, 1, 2]}), other)
    assert one == "`python -m benchmarks.distill --teacher-steps 3000 --steps 4000 --student-seeds 0 1 2 --results benchmarks/results/archive/distill_s4000`"
    # rows of other seeds (a single-seed row trains at --seed): no one --student-seeds, the JSON has them per row
    mixed = bench.rerun_command(res({"relation_kd": [0, 1, 2], "skd": None}, seed=1), bench.RESULTS)
    assert mixed == "`python -m benchmarks.distill --teacher-steps 3000 --steps 4000 --seed 1` (each row's student seeds: `seeds` in results.json)"
    assert bench.rerun_command({"domains": {}}) == "`python -m benchmarks.distill`"  # settings not recorded
    md = bench.markdown(bench.summarise(res({"relation_kd": [0, 1, 2]})), other)
    assert (
        "Rerun: `python -m benchmarks.distill --teacher-steps 3000 --steps 4000 --student-seeds 0 1 2 --results benchmarks/results/archive/distill_s4000`."
        in md
    )


def test_markdown_points_to_the_notes_people_write_and_holds_none_of_them() -> None:
    row = {"dice": {"lung/JSRT": 0.97}, "params": 300_000}
    res = {"steps": 400, "teacher_steps": 800, "seed": 0, "domains": {"cxr": {"models": {"teacher": dict(row), "relation_kd": dict(row)}, "unseen_source": {}}}}
    md = bench.markdown(bench.summarise(res), bench.RESULTS)
    assert "Notes (written by people, not generated): [NOTES.md](NOTES.md)." in md
    assert "--results" not in md  # the default results folder needs no flag in the rerun line
    notes = (bench.RESULTS / "NOTES.md").read_text(encoding="utf-8")
    paragraphs = [p for p in notes.split("\n\n") if p and not p.startswith("#")]
    assert len(paragraphs) > 10 and not any(p in md for p in paragraphs)
    assert not hasattr(bench, "NOTES")


# The arms as benchmarks/distill.py defined them in ten parallel structures before the arms file
# (benchmarks/configs/distill/_models.yaml): the table must give exactly these settings and orders.
# fmt: off
_DEFAULT, _FULL = ("student_alone", "logit_kd"), ("student_alone_full", "logit_kd_full")
BEFORE = {
    "STUDENTS": {
        "student_alone": "student_alone", "logit_kd": "logit_kd", "relation_kd": "relation", "relation_kd_stem": "relation",
        "student_alone_full": "student_alone", "logit_kd_full": "logit_kd", "relation_kd_full": "relation",
        "skd": "skd", "cwd": "cwd", "relation_no_kernel": "relation_no_kernel", "relation_no_affinity": "relation_no_affinity",
        "skd_full": "skd", "cwd_full": "cwd", "relation_no_kernel_full": "relation_no_kernel", "relation_no_affinity_full": "relation_no_affinity",
        "relation_kd_x10": "relation", "relation_kd_x30": "relation", "relation_kd_cross": "relation_cross", "relation_kd_x10_cross": "relation_cross",
        "student_alone_shuffle": "student_alone", "logit_kd_shuffle": "logit_kd", "relation_kd_shuffle": "relation",
        "relation_kd_500k": "relation", "student_alone_500k": "student_alone",
        "student_alone_aug": "student_alone", "logit_kd_aug": "logit_kd", "relation_kd_aug": "relation",
        "student_alone_sep": "student_alone", "logit_kd_sep": "logit_kd", "relation_kd_sep": "relation",
    },
    "STEM": {
        "relation_kd_stem": 1, "student_alone_full": 0, "logit_kd_full": 0, "relation_kd_full": 0,
        "skd_full": 0, "cwd_full": 0, "relation_no_kernel_full": 0, "relation_no_affinity_full": 0,
    },
    "WEIGHTS": {"relation_kd_x10": {"kernel": 10.0, "affinity": 10.0}, "relation_kd_x30": {"kernel": 30.0, "affinity": 30.0}},
    "CROSS": {"relation_kd_cross": {}, "relation_kd_x10_cross": {"kernel": 10.0, "affinity": 10.0, "cross": 10.0}},
    "SHUFFLE": ["student_alone_shuffle", "logit_kd_shuffle", "relation_kd_shuffle"],
    "BUDGET": {"relation_kd_500k": 500_000, "student_alone_500k": 500_000},
    "AUGMENT": ["student_alone_aug", "logit_kd_aug", "relation_kd_aug"],
    "SEPARABLE": ["student_alone_sep", "logit_kd_sep", "relation_kd_sep"],
    "MULTI": {"logit_kd_multi": "logit_kd", "relation_kd_multi": "relation_kd", "relation_kd_x10_multi": "relation_kd_x10"},
    "MULTI_SOURCES": {"cxr": ["JSRT", "Shenzhen"]},
    "MODELS": [
        "teacher", "student_alone", "logit_kd", "relation_kd", "relation_kd_stem", "student_alone_full", "logit_kd_full", "relation_kd_full",
        "skd", "cwd", "relation_no_kernel", "relation_no_affinity", "skd_full", "cwd_full", "relation_no_kernel_full", "relation_no_affinity_full",
        "relation_kd_x10", "relation_kd_x30", "relation_kd_cross", "relation_kd_x10_cross", "student_alone_shuffle", "logit_kd_shuffle", "relation_kd_shuffle",
        "relation_kd_500k", "student_alone_500k", "student_alone_aug", "logit_kd_aug", "relation_kd_aug", "student_alone_sep", "logit_kd_sep", "relation_kd_sep",
        "logit_kd_multi", "relation_kd_multi", "relation_kd_x10_multi",
    ],
    "RELATION_VS_BASELINES": {
        "relation_kd": _DEFAULT, "relation_kd_full": _FULL, "relation_kd_stem": (), "relation_kd_shuffle": ("student_alone_shuffle", "logit_kd_shuffle"),
        "relation_kd_500k": ("student_alone_500k",), "relation_kd_x10": _DEFAULT, "relation_kd_x30": _DEFAULT, "relation_kd_cross": _DEFAULT,
        "relation_kd_x10_cross": _DEFAULT, "relation_kd_aug": ("student_alone_aug", "logit_kd_aug"), "relation_kd_sep": ("student_alone_sep", "logit_kd_sep"),
    },
    "UNSEEN_MODELS": [
        "teacher", "student_alone", "logit_kd", "relation_kd", "relation_kd_x10", "relation_kd_x30", "relation_kd_cross", "relation_kd_x10_cross",
        "skd", "cwd", "relation_no_kernel", "relation_no_affinity", "relation_kd_stem", "student_alone_full", "logit_kd_full", "relation_kd_full",
        "student_alone_shuffle", "logit_kd_shuffle", "relation_kd_shuffle", "relation_kd_500k", "student_alone_500k",
        "student_alone_aug", "logit_kd_aug", "relation_kd_aug", "student_alone_sep", "logit_kd_sep", "relation_kd_sep",
    ],
}
# fmt: on


def test_the_arms_file_gives_every_arm_the_settings_and_orders_it_had_before() -> None:
    arms, b = bench.ARMS, BEFORE
    single = [n for n, a in arms.items() if a.multi_of is None]
    assert {n: arms[n].loss for n in single} == b["STUDENTS"] and list(single) == list(b["STUDENTS"])
    assert {n: arms[n].stem for n in single if arms[n].stem is not None} == b["STEM"]
    assert {n: arms[n].weights for n in single if arms[n].weights} == {k: v for k, v in {**b["WEIGHTS"], **b["CROSS"]}.items() if v}
    assert [n for n in single if arms[n].loss == "relation_cross"] == list(b["CROSS"])
    assert [n for n in single if arms[n].upsample == "shuffle"] == b["SHUFFLE"]
    assert {n: arms[n].params for n in single if arms[n].params is not None} == b["BUDGET"]
    assert [n for n in single if arms[n].augment == "strong"] == b["AUGMENT"]
    assert [n for n in single if arms[n].separable] == b["SEPARABLE"]
    assert bench.MULTI == b["MULTI"] and bench.MULTI_SOURCES == b["MULTI_SOURCES"]
    assert bench.MODELS == b["MODELS"] and bench.UNSEEN_MODELS == b["UNSEEN_MODELS"]
    assert list(bench.RELATION_VS_BASELINES.items()) == list(b["RELATION_VS_BASELINES"].items())  # the targets' order too
    assert bench.WEIGHT_CHOICES == ["relation_kd", *b["WEIGHTS"], *b["CROSS"]]  # what chosen_by_validation chooses between
    assert all(a.why for a in arms.values())


def test_every_arm_trains_as_it_did_before(monkeypatch, tmp_path) -> None:
    """What train_student passes the recipe for each arm (train_distill replaced by a recorder), against
    what the ten structures gave it before."""
    from medalloy.recipes.distill import DistillConfig, DistillWeights

    seen: dict[str, tuple] = {}

    def fake_train(dataset, teacher, run, config, **kw):
        seen[run.name] = (config, kw)
        return {}

    monkeypatch.setattr("medalloy.recipes.distill.train_distill", fake_train)
    monkeypatch.setattr(bench, "dataset_path", lambda member, data, work: tmp_path / member)
    monkeypatch.setattr(bench, "union_split", lambda *a: {"train": ["a"], "val": ["b"]})
    b = BEFORE
    for model in bench.MODELS[1:]:
        bench.train_student("cxr", model, ["JSRT"], tmp_path / "teacher", tmp_path, tmp_path, 10, 0, "", 0)
        base = b["MULTI"].get(model, model)
        config, kw = seen[model]
        weights = {**b["WEIGHTS"], **b["CROSS"]}.get(base)
        assert config == DistillConfig(weights=DistillWeights(**(weights or {})), augment="strong" if base in b["AUGMENT"] else "default"), model
        assert (kw["losses"], kw["student"], kw["separable"], kw["stem"], kw["upsample"]) == (
            b["STUDENTS"][base],
            b["BUDGET"].get(base, "tiny"),
            base in b["SEPARABLE"],
            b["STEM"].get(base),
            "shuffle" if base in b["SHUFFLE"] else None,
        ), model
        assert bench.architecture(model, {"params": 1}) == ("student", b["STEM"].get(model, "default"), model in b["SEPARABLE"], 1)


def test_the_committed_markdown_is_rendered_from_the_committed_json() -> None:
    results = json.loads((bench.RESULTS / "results.json").read_text(encoding="utf-8"))
    assert bench.markdown(bench.summarise(results), bench.RESULTS) == (bench.RESULTS / "results.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ("skd: {loss: skd, stems: 0}", "arm 'skd': unknown field 'stems'"),
        ("skd: {stem: 0}", "arm 'skd': no loss"),
        ("skd: {loss: skd, augment: heavy}", "arm 'skd': field 'augment'"),
        ("cwd_multi: {multi_of: cwd, loss: cwd}", "arm 'cwd_multi': a multi-source arm takes every setting from its multi_of arm"),
        ("relation_kd: {loss: relation, baselines: [skd_full]}", "arm 'relation_kd': baseline 'skd_full' is not another single-source arm"),
    ],
)
def test_a_wrong_arm_is_one_line_naming_the_file_and_the_arm(tmp_path, arm: str, message: str) -> None:
    path = tmp_path / "_models.yaml"
    path.write_text(f"arms:\n  cwd: {{loss: cwd}}\n  {arm}\n", encoding="utf-8")
    with pytest.raises(bench.ArmsError) as err:
        bench.load_arms(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_the_orders_name_arms_that_have_the_rows_and_the_rest_follow(tmp_path) -> None:
    path = tmp_path / "_models.yaml"
    arms = "arms:\n  a: {loss: skd, unseen: true}\n  b: {loss: cwd, unseen: true}\n  c: {loss: cwd}\n"
    path.write_text(arms + "unseen_order: [b]\n", encoding="utf-8")
    assert bench.load_arms(path).unseen == ["b", "a"]
    path.write_text(arms + "unseen_order: [c]\n", encoding="utf-8")
    with pytest.raises(bench.ArmsError, match="unseen_order: arm 'c' is not an arm with unseen: true"):
        bench.load_arms(path)
