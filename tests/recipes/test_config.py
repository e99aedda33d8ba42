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
    cfg = resolve_config(ExpertConfig, given, {"steps": 7, "batch_size": 3}, progress=False, top_keys=("fold", "batch_size"))
    assert given.model_dump() == before  # the caller's object: progress still on, steps unchanged
    assert cfg is not given and cfg.train is not given.train
    assert (cfg.fold, cfg.train.steps, cfg.batch_size, cfg.train.progress) == (1, 7, 3, False)


def test_unknown_overrides_are_refused():
    with pytest.raises(MedalloyError, match="unknown setting.*stepz"):
        expert_config(None, stepz=5)
