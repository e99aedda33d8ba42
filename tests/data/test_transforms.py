"""Augmentation presets: a name stands for its settings, in YAML, Python and on the command line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from medalloy.data.transforms import AUGMENT_PRESETS, AugmentConfig, training_transforms


def test_a_preset_name_stands_for_its_settings_and_fields_change_it():
    strong = AugmentConfig.model_validate("strong")
    assert strong.model_dump() == AugmentConfig(**AUGMENT_PRESETS["strong"]).model_dump()
    assert strong.p_contrast == 0.5 and strong.gamma == (0.5, 2.0) and AugmentConfig().p_contrast == 0.15
    assert AugmentConfig.model_validate("default") == AugmentConfig()
    tweaked = AugmentConfig.model_validate({"preset": "strong", "p_blur": 0.9})
    assert tweaked.p_blur == 0.9 and tweaked.p_affine == 0.5
    with pytest.raises(ValidationError, match="unknown augmentation preset 'wild'; use one of default, strong"):
        AugmentConfig.model_validate("wild")


def test_the_strong_preset_reaches_the_transforms():
    ops = training_transforms(2, AugmentConfig.model_validate("strong")).transforms
    probs = {type(t).__name__: t.prob for t in ops}
    assert probs["RandAffined"] == 0.5 and probs["RandAdjustContrastd"] == 0.5 and probs["RandScaleIntensityd"] == 0.5
    assert probs["RandGaussianNoised"] == 0.2 and probs["RandGaussianSmoothd"] == 0.3


def test_yaml_and_the_distill_flag_take_a_preset(tmp_path, monkeypatch):
    import medalloy.recipes.distill as recipe
    from medalloy.cli import AUGMENT_CHOICES, main
    from medalloy.recipes.config import load_recipe_config

    assert AUGMENT_CHOICES == tuple(AUGMENT_PRESETS)  # the parser's copy of the names
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text("augment: strong\n", encoding="utf-8")
    from_yaml = load_recipe_config(recipe.DistillConfig, cfg_file, {})
    from_flag = load_recipe_config(recipe.DistillConfig, None, {"augment": "strong"})
    assert from_yaml.augment == from_flag.augment == AugmentConfig.model_validate("strong")
    assert load_recipe_config(recipe.DistillConfig, None, {"augment": None}).augment == AugmentConfig()

    seen = []
    monkeypatch.setattr(
        recipe, "train_distill", lambda *a, **kw: seen.append(kw.get("augment")) or {"params": 1, "teacher_params": 2, "steps": 0, "seconds": 0.0, "best": {}}
    )
    assert main(["distill", "DS", "--teacher", "T", "--out", "O", "--augment", "strong"]) == 0
    assert main(["distill", "DS", "--teacher", "T", "--out", "O"]) == 0
    assert seen == ["strong", None]


def test_the_flag_sets_the_preset_under_the_yaml_fields_and_bad_names_are_one_line(tmp_path):
    import medalloy.recipes.distill as recipe
    from medalloy.errors import MedalloyError
    from medalloy.recipes.config import load_recipe_config

    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text("augment:\n  p_blur: 0.9\n", encoding="utf-8")
    cfg = load_recipe_config(recipe.DistillConfig, cfg_file, {"augment": {"preset": "strong"}})  # what train_distill makes of "strong"
    assert cfg.augment.p_blur == 0.9 and cfg.augment.p_contrast == 0.5  # the YAML's field over the flag's preset
    for bad in ("wild", {"preset": ["strong"]}):
        with pytest.raises(MedalloyError, match="unknown augmentation preset") as err:
            load_recipe_config(recipe.DistillConfig, None, {"augment": bad})
        assert "\n" not in str(err.value)
