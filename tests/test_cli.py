"""The ``medalloy`` command tree: ``train <method>``, the old top-level names as aliases, ``--set``."""

from __future__ import annotations

import re

import pytest

import medalloy.cli as cli
from medalloy.cli import build_parser, main

# the required arguments of each moved method
MOVED_ARGS = {
    "distill": ["DS", "--teacher", "T", "--out", "O"],
    "amalgamate": ["DS1", "DS2", "--experts", "E1", "E2", "--out", "O"],
    "pretrain": ["--pairs", "pairs.csv", "--out", "O"],
}
FLAGS = {
    "distill": ["--student", "small", "--stem-depth", "2", "--augment", "strong", "--steps", "7", "--fold", "1", "--resume"],
    "amalgamate": ["--stages", "enc4", "--decoder", "plain", "--no-expert-priors", "--batch-size", "3", "--seed", "5"],
    "pretrain": ["--losses", "global", "token", "--image-size", "32", "--patient-column", "none", "--budget-minutes", "1.5"],
}
TRAIN_ARGS = {"expert": ["DS", "--out", "O"], "universal": ["DS1", "DS2", "--out", "O"], **MOVED_ARGS}


@pytest.mark.parametrize("method", sorted(MOVED_ARGS))
def test_train_method_and_its_old_name_parse_alike(method):
    parser = build_parser()
    new = vars(parser.parse_args(["train", method, *MOVED_ARGS[method], *FLAGS[method]]))
    old = vars(parser.parse_args([method, *MOVED_ARGS[method], *FLAGS[method]]))
    assert new["fn"] is old["fn"] is getattr(cli, f"cmd_{method}")
    assert (new.pop("command"), new.pop("method"), old.pop("command"), old.pop("moved")) == ("train", method, method, method)
    assert "moved" not in new
    assert new == old and new["set"] is None


def test_the_old_names_are_left_out_of_the_help():
    text = build_parser().format_help()
    commands = text.split("{", 1)[1].split("}", 1)[0].split(",")
    assert commands[:3] == ["data", "plan", "train"] and not set(commands) & set(MOVED_ARGS)
    listed = re.findall(r"^    (\S+)", text, flags=re.MULTILINE)  # a command per line, its help beside or below it
    assert listed == commands


@pytest.mark.parametrize("method", sorted(MOVED_ARGS))
def test_an_old_name_runs_the_same_function_and_says_where_it_moved(method, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, f"cmd_{method}", lambda a: calls.append(a) or 0)
    assert main([method, *MOVED_ARGS[method]]) == 0
    err = capsys.readouterr().err
    assert err == f"medalloy: 'medalloy {method}' is now 'medalloy train {method}'; the old name will go in a later release\n"
    assert main(["train", method, *MOVED_ARGS[method]]) == 0
    assert capsys.readouterr().err == ""
    assert len(calls) == 2 and vars(calls[0])["out"] == vars(calls[1])["out"] == "O"


@pytest.mark.parametrize("method", sorted(TRAIN_ARGS))
def test_every_train_method_takes_repeated_set(method):
    args = build_parser().parse_args(["train", method, *TRAIN_ARGS[method], "--set", "train.lr=1e-3", "--set", "augment.preset=strong"])
    assert args.set == ["train.lr=1e-3", "augment.preset=strong"]


def _sets(*pairs: str) -> list[str]:
    return [x for pair in pairs for x in ("--set", pair)]


def _capture(monkeypatch, module: str, function: str) -> list[dict]:
    """Replace ``medalloy.recipes.<module>.<function>`` by a recorder of the overrides it is given."""
    import importlib

    seen: list[dict] = []
    result = {"params": 1, "teacher_params": 2, "steps": 0, "seconds": 0.0, "best": {}, "tasks": [], "experts": [], "trainable_params": 0}

    def record(*args, **kw):
        seen.append({k: v for k, v in kw.items() if k not in ("config", "resume", "overwrite", "progress")})
        return result

    monkeypatch.setattr(importlib.import_module(f"medalloy.recipes.{module}"), function, record)
    return seen


def test_set_values_are_yaml_and_reach_the_recipe_config(monkeypatch):
    from medalloy.recipes import amalgamate, distill
    from medalloy.recipes.config import load_recipe_config

    seen = _capture(monkeypatch, "distill", "train_distill")
    sets = _sets("train.lr=1e-3", "augment.preset=strong", "separable=true", "stages=[enc4, dec1]", "stem=null")
    assert main(["-q", "train", "distill", *MOVED_ARGS["distill"], "--augment", "default", "--stem-depth", "2", *sets]) == 0
    overrides = seen[-1]
    assert overrides["set"] == {"train.lr": 1e-3, "augment.preset": "strong", "separable": True, "stages": ["enc4", "dec1"], "stem": None}
    assert isinstance(overrides["set"]["train.lr"], float) and (overrides["augment"], overrides["stem"]) == ("default", 2)
    overrides["augment"] = {"preset": overrides["augment"]}  # as train_distill hands on the flag's preset
    cfg = load_recipe_config(distill.DistillConfig, None, distill.TOP_KEYS, overrides)
    assert (cfg.train.lr, cfg.separable, cfg.stages, cfg.stem) == (1e-3, True, ["enc4", "dec1"], None)  # --set over --stem-depth 2
    assert (cfg.augment.p_affine, cfg.augment.rotate_degrees) == (0.5, 20.0)  # the strong preset, over --augment default

    seen = _capture(monkeypatch, "amalgamate", "train_amalgamate")
    assert main(["-q", "train", "amalgamate", *MOVED_ARGS["amalgamate"], "--stages", "bottleneck", *_sets("stages=[enc4]", "width=32")]) == 0
    cfg = load_recipe_config(amalgamate.AmalgamateConfig, None, amalgamate.TOP_KEYS, seen[-1])
    assert (cfg.stages, cfg.width) == (["enc4"], 32)


def test_set_errors_are_one_line_before_any_work(monkeypatch, capsys):
    from medalloy.recipes import universal

    built = []

    def fake(*args, config=None, resume=False, overwrite=False, progress=True, **overrides):
        built.append(universal.load_config(config, **overrides))  # what train_universal does first
        return {"tasks": [], "steps": 0, "seconds": 0.0, "best": {}}

    monkeypatch.setattr(universal, "train_universal", fake)
    base = ["-q", "train", "universal", *TRAIN_ARGS["universal"]]
    assert main([*base, "--steps", "9", *_sets("fusion_width=32", "train.ema_decay=0.99", "train.steps=11")]) == 0
    assert (built[-1].fusion_width, built[-1].train.ema_decay, built[-1].train.steps) == (32, 0.99, 11)

    for pair, message in [
        ("fusion_widht=32", "--set fusion_widht: UniversalConfig has no field 'fusion_widht'; use one of train, augment, fold, folds, max_val_cases, batch_size, dim,"),
        ("train.lrr=1", "--set train.lrr: UniversalConfig.train has no field 'lrr'; use one of steps, optimizer, lr,"),
        ("train.lr=fast", "config field 'train.lr': Input should be a valid number"),
        ("fusion_width", "--set 'fusion_width' is not KEY=VALUE; write e.g. --set train.lr=1e-3"),
    ]:
        assert main([*base, "--set", pair]) == 1
        err = capsys.readouterr().err
        assert err.startswith("medalloy: error: ") and message in err and err.count("\n") == 1, err
    assert len(built) == 1  # no config came of a wrong --set
