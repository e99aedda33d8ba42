"""Recipe configs: YAML + CLI overrides for experts and the universal model, one-line errors."""

from __future__ import annotations

import pytest

from medalloy.errors import MedalloyError
from medalloy.recipes.expert import load_config as expert_config
from medalloy.recipes.universal import load_config as universal_config


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n  lr: 0.001\n  steps: 50\naugment:\n  mirror: false\nbatch_size: 4\n", encoding="utf-8")
    cfg = expert_config(cfg_file, steps=70, seed=None, fold=2)
    assert (cfg.train.lr, cfg.train.steps, cfg.train.seed, cfg.fold, cfg.batch_size) == (0.001, 70, 0, 2, 4)
    assert cfg.augment.mirror is False
    assert expert_config(None).train.lr == 3e-3 and expert_config(None).train.steps == 1000
    uni = universal_config(None, patch_size=96, time_budget_minutes=5.0)
    assert (uni.patch_size, uni.train.time_budget_minutes, uni.train.lr, uni.train.steps) == (96, 5.0, 2e-3, 2000)


@pytest.mark.parametrize(
    ("text", "match"),
    [("train: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "not a YAML mapping"), ("train:\n  lr: -1\n", "train.lr"), ("bogus: 1\n", "bogus")],
)
def test_bad_config_files_fail_in_one_line(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    for load in (expert_config, universal_config):
        with pytest.raises(MedalloyError, match=match) as info:
            load(path)
        assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)
    with pytest.raises(MedalloyError, match="config not found"):
        expert_config(tmp_path / "missing.yaml")


def test_a_config_object_is_copied_never_changed():
    from medalloy.recipes.expert import ExpertConfig
    from medalloy.recipes.scaffold import resolve_config

    given = ExpertConfig(fold=1)
    before = given.model_dump()
    cfg = resolve_config(ExpertConfig, given, {"steps": 7, "batch_size": 3}, progress=False)
    assert given.model_dump() == before  # the caller's object: progress still on, steps unchanged
    assert cfg is not given and cfg.train is not given.train
    assert (cfg.fold, cfg.train.steps, cfg.batch_size, cfg.train.progress) == (1, 7, 3, False)


def test_unknown_overrides_are_refused():
    with pytest.raises(MedalloyError, match="unknown setting.*stepz") as info:
        expert_config(None, stepz=5)
    assert "use steps or another field of ExpertConfig or of its train section" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MedalloyError, match="unknown setting.*patch_size"):
        expert_config(None, patch_size=64)  # a field of another recipe's config


def test_named_overrides_are_the_config_fields_and_the_train_fields():
    from medalloy.recipes.amalgamate import AmalgamateConfig
    from medalloy.recipes.config import load_recipe_config, override_names
    from medalloy.recipes.distill import DistillConfig
    from medalloy.recipes.expert import ExpertConfig
    from medalloy.recipes.pretrain import PretrainConfig
    from medalloy.recipes.universal import UniversalConfig

    cfg = expert_config(None, max_val_cases=4, warmup_steps=3, lr=1e-4, steps=5, fold=1)
    assert (cfg.max_val_cases, cfg.train.warmup_steps, cfg.train.lr, cfg.train.steps, cfg.fold) == (4, 3, 1e-4, 5, 1)
    uni = universal_config(None, fusion_width=32, task_anchors=False, plan_options={"Dataset001_A": {"max_2d_side": 64}})
    assert (uni.fusion_width, uni.task_anchors, uni.plan_options["Dataset001_A"].max_2d_side) == (32, False, 64)
    top, train = override_names(ExpertConfig)
    assert (
        top == ("augment", "fold", "folds", "max_val_cases", "batch_size", "plan_for_budget")
        and train[:3] == ("steps", "optimizer", "lr")
        and "time_budget_minutes" in train
    )
    for cls in (ExpertConfig, UniversalConfig, DistillConfig, AmalgamateConfig, PretrainConfig):
        top, train = override_names(cls)
        assert not set(top) & set(train) and "train" not in top and "seed" in train  # one meaning per name
    pre = load_recipe_config(PretrainConfig, None, {"columns": {"patient": "none"}, "text_only_findings": "notes", "time_budget_minutes": 2.0})
    assert (pre.columns.patient, pre.columns.image, pre.text_only_findings, pre.train.time_budget_minutes) == (None, "image", "notes", 2.0)


def test_set_changes_any_field_by_dotted_path_over_yaml_and_flags(tmp_path):
    from medalloy.data.transforms import AugmentConfig

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n  lr: 0.001\n  steps: 50\naugment:\n  p_blur: 0.3\nfold: 1\n", encoding="utf-8")
    cfg = expert_config(cfg_file, lr=0.002, fold=2, set={"train.lr": 0.005, "train.warmup_steps": 4, "fold": 3, "augment.preset": "strong"})
    assert (cfg.train.lr, cfg.train.steps, cfg.train.warmup_steps, cfg.fold) == (0.005, 50, 4, 3)  # --set over the flag and the YAML
    assert cfg.augment == AugmentConfig.model_validate({"preset": "strong", "p_blur": 0.3})  # the YAML's own field stays over a preset
    cfg = expert_config(cfg_file, set=["augment.p_blur=0.9", "augment.mirror=false", "batch_size=null", "train.ema_decay=1e-3"])
    assert (cfg.augment.p_blur, cfg.augment.mirror, cfg.batch_size, cfg.train.ema_decay, cfg.train.lr) == (0.9, False, None, 1e-3, 0.001)
    assert expert_config(None, steps=70, set=["train.steps=5", "train.steps=6"]).train.steps == 6  # a later one wins
    strong = tmp_path / "strong.yaml"
    strong.write_text("augment: strong\n", encoding="utf-8")  # a section given as a preset name is expanded first
    assert expert_config(strong, set=["augment.p_noise=0.05"]).augment == AugmentConfig.model_validate({"preset": "strong", "p_noise": 0.05})


def test_set_reaches_lists_and_mappings_of_models():
    from medalloy.recipes.amalgamate import AmalgamateConfig
    from medalloy.recipes.config import load_recipe_config, parse_sets

    uni = universal_config(None, set=["fusion_width=32", "plan_options.Dataset001_A.max_2d_side=64", "task_names.lung=lungs=both"])
    assert (uni.fusion_width, uni.plan_options["Dataset001_A"].max_2d_side, uni.task_names) == (32, 64, {"lung": "lungs=both"})
    cfg = load_recipe_config(AmalgamateConfig, None, {"stages": ["bottleneck"], "set": ["stages=[enc4]"]})
    assert cfg.stages == ["enc4"]
    assert parse_sets(["a.b=[1, 2.5, x]", "c=", "d= 1e-3", "e='1e-3'", "f=on"]) == {"a.b": [1, 2.5, "x"], "c": None, "d": 0.001, "e": "1e-3", "f": True}


def test_set_leaves_a_given_config_object_unchanged():
    from medalloy.recipes.expert import ExpertConfig
    from medalloy.recipes.scaffold import resolve_config

    given = ExpertConfig(fold=1)
    before = given.model_dump()
    cfg = resolve_config(ExpertConfig, given, {"steps": 7, "set": {"train.steps": 8, "augment.p_noise": 0.5}}, progress=False)
    assert given.model_dump() == before
    assert (cfg.fold, cfg.train.steps, cfg.augment.p_noise) == (1, 8, 0.5)


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["bogus=1"], r"^--set bogus: ExpertConfig has no field 'bogus'; use one of train, augment, fold, folds, max_val_cases, batch_size, plan_for_budget$"),
        (["train.lrr=1"], r"^--set train.lrr: ExpertConfig.train has no field 'lrr'; use one of steps, optimizer, lr, "),
        (["augment.bogus=1"], r"^--set augment.bogus: ExpertConfig.augment has no field 'bogus'; use one of enabled, "),
        (["fold.x=1"], r"^--set fold.x: 'fold' is a value, not a section; set it whole: --set fold=VALUE$"),
        (["train.lr=fast"], r"^config: config field 'train.lr': Input should be a valid number"),
        (["augment.preset=wild"], r"unknown augmentation preset 'wild'"),
        (["train.lr"], r"^--set 'train.lr' is not KEY=VALUE; write e.g. --set train.lr=1e-3$"),
        (["=1"], r"is not KEY=VALUE"),
        (["a=[1"], r"^--set 'a=\[1': the value is not valid YAML"),
    ],
)
def test_wrong_sets_fail_in_one_line(sets, match):
    with pytest.raises(MedalloyError, match=match) as info:
        expert_config(None, set=sets)
    assert "\n" not in str(info.value)
