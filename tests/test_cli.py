"""The ``medalloy`` command tree: ``train <method>``, the old top-level names as aliases, ``--set``."""

from __future__ import annotations

import functools
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


def test_the_help_lists_every_command_once_by_group_and_not_the_old_names():
    text = build_parser().format_help()
    listed = re.findall(r"^  ([a-z]\S*)  ", text.split("commands, by what they are for:")[1], flags=re.MULTILINE)  # a command per line, its help beside it
    at = [text.index(f"\n{g}:\n") for g in cli.COMMAND_GROUPS]
    assert at == sorted(at)
    assert listed == [n for names in cli.COMMAND_GROUPS.values() for n in names]
    assert not set(listed) & set(MOVED_ARGS)
    assert listed[:3] == ["data", "plan", "train"] and "export" in listed and "pipeline" in listed


def _all_flags(parser, path=("medalloy",)):
    import argparse

    parser.ready() if hasattr(parser, "ready") else None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_flags(sub, (*path, name))
        elif action.option_strings and action.dest not in ("help", "version"):
            yield " ".join(path), parser, action


def test_every_flag_of_every_command_has_help_that_says_its_default():
    missing, silent = [], []
    for where, parser, action in _all_flags(build_parser()):
        shown = parser._get_formatter()._expand_help(action) if action.help else ""
        if not shown.strip():
            missing.append(f"{where} {action.option_strings[0]}")
        elif action.default not in (None, False) and "default" not in shown.lower():
            silent.append(f"{where} {action.option_strings[0]}: {shown}")
    assert not missing, missing
    assert not silent, silent


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
    # the flags' settings first (--stem-depth 2), then --set's, a later key over an earlier one
    assert overrides["set"] == {"stem": None, "train.lr": 1e-3, "augment.preset": "strong", "separable": True, "stages": ["enc4", "dec1"]}
    assert isinstance(overrides["set"]["train.lr"], float) and overrides["augment"] == "default"
    overrides["augment"] = {"preset": overrides["augment"]}  # as train_distill hands on the flag's preset
    cfg = load_recipe_config(distill.DistillConfig, None, overrides)
    assert (cfg.train.lr, cfg.separable, cfg.stages, cfg.stem) == (1e-3, True, ["enc4", "dec1"], None)  # --set over --stem-depth 2
    assert (cfg.augment.p_affine, cfg.augment.rotate_degrees) == (0.5, 20.0)  # the strong preset, over --augment default

    seen = _capture(monkeypatch, "amalgamate", "train_amalgamate")
    assert main(["-q", "train", "amalgamate", *MOVED_ARGS["amalgamate"], "--stages", "bottleneck", *_sets("stages=[enc4]", "width=32")]) == 0
    cfg = load_recipe_config(amalgamate.AmalgamateConfig, None, seen[-1])
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
        (
            "fusion_widht=32",
            "--set fusion_widht: UniversalConfig has no field 'fusion_widht'; use one of train, augment, fold, folds, max_val_cases, batch_size, dim,",
        ),
        ("train.lrr=1", "--set train.lrr: UniversalConfig.train has no field 'lrr'; use one of steps, optimizer, lr,"),
        ("train.lr=fast", "config field 'train.lr': Input should be a valid number"),
        ("fusion_width", "--set 'fusion_width' is not KEY=VALUE; write e.g. --set train.lr=1e-3"),
    ]:
        assert main([*base, "--set", pair]) == 1
        err = capsys.readouterr().err
        assert err.startswith("medalloy: error: ") and message in err and err.count("\n") == 1, err
    assert len(built) == 1  # no config came of a wrong --set


# today's flags of each train method (besides -h), the field flags and the written-out ones together: none more, none fewer
OPTIONS = {
    "expert": "--budget-minutes --config --device --fold --init --out --overwrite --plan --precision --resume --seed --set --steps",
    "universal": "--batch-size --budget-minutes --config --datasets-per-step --device --dim --fold --out --overwrite --patch --precision --priors --resume "
    "--seed --set --steps",
    "distill": "--augment --batch-size --budget-minutes --config --device --fold --losses --out --overwrite --precision --resume --seed --separable --set "
    "--stem --stem-depth --steps --student --teacher --upsample",
    "amalgamate": "--batch-size --budget-minutes --config --datasets-per-step --decoder --device --experts --feature-size --flat --fold --foundation "
    "--no-expert-priors --out --overwrite --precision --resume --seed --set --stages --steps",
    "pretrain": "--batch-size --budget-minutes --config --device --findings-column --image-column --image-dir --image-size --impression-column --losses --out "
    "--overwrite --pairs --patient-column --plan --precision --resume --seed --set --skip-empty --steps --summarize-steps --text-encoder --text-only "
    "--text-only-findings-column --text-only-impression-column --token-scope --val-fraction",
}
# the function each train method calls
TRAIN_FUNCTIONS = {
    "expert": "train_expert", "universal": "train_universal", "distill": "train_distill", "amalgamate": "train_amalgamate", "pretrain": "pretrain",
}  # fmt: skip
# a value other than the method's default for each field flag (losses: distillation's name or pretraining's list)
FIELD_VALUES = {
    "fold": 1, "batch_size": 3, "dim": 3, "datasets_per_step": 3, "priors": "task", "student": "small", "upsample": "shuffle", "feature_size": 24,
    "decoder": "plain", "image_size": 32, "text_encoder": "scratch", "summarize_steps": 9, "token_scope": "pair", "val_fraction": 0.25,
    "train.steps": 7, "train.seed": 5, "train.precision": "bf16", "train.device": "cpu",
}  # fmt: skip
LOSSES = {"distill": "cwd", "pretrain": ["global", "token"]}
FIELD_FLAG_CASES = [(method, path) for method, (_, paths) in cli.FIELD_FLAGS.items() for path in paths]


def _train_parser(method: str):
    """The parser of ``medalloy train METHOD``, all its flags added."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return train._subparsers._group_actions[0].choices[method].ready()


def _run_train(monkeypatch, method: str, flags: list[str]) -> dict:
    """``medalloy -q train METHOD <required> FLAGS`` with the recipe's function replaced: the keywords it was given."""
    import importlib

    seen: list[dict] = []
    result = {"params": 1, "teacher_params": 2, "steps": 0, "seconds": 0.0, "best": {}, "tasks": [], "experts": [], "trainable_params": 0}
    result.update({"train_pairs": 0, "text_only_pairs": 0, "text_encoder": "scratch", "losses": [], "skipped": {}, "images_per_s": 0.0, "precision": "fp32"})
    monkeypatch.setattr(importlib.import_module(f"medalloy.recipes.{method}"), TRAIN_FUNCTIONS[method], lambda *a, **kw: seen.append(kw) or result)
    assert main(["-q", "train", method, *TRAIN_ARGS[method], *flags]) == 0
    return seen[-1]


def _config_of(method: str, given: dict):
    """The config the recipe makes of the keywords the command gave it (as train_distill, a preset name under the YAML's fields)."""
    from medalloy.recipes.config import load_recipe_config

    overrides = {k: v for k, v in given.items() if k in ("set", "augment")}
    if isinstance(overrides.get("augment"), str):
        overrides["augment"] = {"preset": overrides["augment"]}
    return load_recipe_config(cli.config_class(method), None, overrides)


@pytest.mark.parametrize(("method", "path"), FIELD_FLAG_CASES, ids=[f"{m}-{p}" for m, p in FIELD_FLAG_CASES])
def test_every_field_flag_reaches_its_config_field(method, path, monkeypatch):
    from medalloy.recipes.config import field_at, load_recipe_config

    name = path.rsplit(".", 1)[-1]
    value = LOSSES[method] if name == "losses" else FIELD_VALUES[path]
    given = _run_train(monkeypatch, method, [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])])
    assert given["set"] == {path: value}  # through the dotted-path override, typed by the field
    cls = cli.config_class(method)
    cfg = _config_of(method, given)
    assert functools.reduce(getattr, path.split("."), cfg) == value != field_at(cls, path)[1]
    assert cfg == load_recipe_config(cls, None, {name: value})  # what the Python API makes of train_<method>(..., name=value)
    assert _config_of(method, _run_train(monkeypatch, method, [])) == cls()  # no flag: nothing set


# the flags that are no one field: what each sets, as the Python API's keywords
SPECIAL_FLAGS = [
    ("expert", ["--budget-minutes", "1.5"], {"time_budget_minutes": 1.5}),
    ("universal", ["--patch", "64"], {"patch_size": 64}),
    ("universal", ["--budget-minutes", "2"], {"time_budget_minutes": 2.0}),
    ("distill", ["--stem"], {"stem": 1}),
    ("distill", ["--stem", "--stem-depth", "0"], {"stem": 0}),
    ("distill", ["--separable"], {"separable": True}),
    ("distill", ["--augment", "strong"], {"augment": "strong"}),
    ("amalgamate", ["--flat"], {"hierarchical": False}),
    ("amalgamate", ["--no-expert-priors"], {"expert_priors": False}),
    ("amalgamate", ["--foundation", "swinunetr"], {"foundation": "scratch"}),
    ("amalgamate", ["--foundation", "w.safetensors"], {"foundation": "w.safetensors"}),
    ("amalgamate", ["--stages", "none"], {"stages": []}),
    ("amalgamate", ["--stages", "enc3", "enc4"], {"stages": ["enc3", "enc4"]}),
    ("pretrain", ["--skip-empty"], {"skip_empty": True}),
    ("pretrain", ["--text-only-findings-column", "n", "--text-only-impression-column", "s"], {"text_only_findings": "n", "text_only_impression": "s"}),
    ("pretrain", ["--patient-column", "none", "--image-dir", "imgs"], {"columns": {"patient": "none", "image_dir": "imgs"}}),
    ("pretrain", ["--image-column", "p", "--findings-column", "f", "--impression-column", "i"],
     {"columns": {"image": "p", "findings": "f", "impression": "i"}}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "flags", "keywords"), SPECIAL_FLAGS, ids=[" ".join([m, *f]) for m, f, _ in SPECIAL_FLAGS])
def test_the_flags_that_are_no_one_field_keep_their_meaning(method, flags, keywords, monkeypatch):
    from medalloy.recipes.config import load_recipe_config

    cls = cli.config_class(method)
    given = _run_train(monkeypatch, method, flags)
    assert given.get("set") or given.get("augment")  # something set, even where it is the default (--foundation swinunetr)
    assert _config_of(method, given) == load_recipe_config(cls, None, dict(keywords))


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_each_train_method_has_todays_flags_and_flags_each_field_once(method):
    from medalloy.recipes.config import field_at

    options = sorted(o for action in _train_parser(method)._actions for o in action.option_strings if o not in ("-h", "--help"))
    assert options == OPTIONS[method].split()
    paths = cli.FIELD_FLAGS[method][1]
    assert len(set(paths)) == len(paths) and len({p.rsplit(".", 1)[-1] for p in paths}) == len(paths)
    cls = cli.config_class(method)
    for path in paths:
        info, _ = field_at(cls, path)  # a KeyError for a path the config lacks
        assert info.description, f"{cls.__name__}.{path} gets a flag: its Field(description=...) is the flag's help"
    with pytest.raises(KeyError, match="has no field train.stepz"):
        field_at(cls, "train.stepz")


@pytest.mark.parametrize(("method", "path"), FIELD_FLAG_CASES, ids=[f"{m}-{p}" for m, p in FIELD_FLAG_CASES])
def test_a_field_flag_takes_only_what_its_field_does(method, path, capsys):
    from medalloy.recipes.config import field_at

    flag = f"--{path.rsplit('.', 1)[-1].replace('_', '-')}"
    text = field_at(cli.config_class(method), path)[0].annotation in (str, str | int)  # any text: the device, a student size or plan
    try:
        _train_parser(method).parse_args([*TRAIN_ARGS[method], flag, "bogus"])
        refused = False
    except SystemExit:  # argparse: not a number, or not one of the Literal's choices
        refused = True
    assert refused != text and ("invalid" in capsys.readouterr().err) == refused


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_a_field_flags_help_is_the_fields_description_and_the_methods_default(method, monkeypatch):
    from medalloy.recipes.config import field_at

    monkeypatch.setenv("COLUMNS", "1000")  # no help wrapped within a line
    text = " ".join(_train_parser(method).format_help().split())
    cls = cli.config_class(method)
    for path in cli.FIELD_FLAGS[method][1]:
        info, default = field_at(cls, path)
        shown = "" if default is None else f" (default: {' '.join(default) if isinstance(default, list) else default})"
        flag = f"--{path.rsplit('.', 1)[-1].replace('_', '-')}"
        assert re.search(re.escape(flag) + r" [^-]+ " + re.escape(info.description + shown) + r"( --|$)", text), (flag, info.description + shown)
    steps = {"expert": 1000, "universal": 2000, "distill": 2000, "amalgamate": 2000, "pretrain": 2000}[method]
    assert f"--steps STEPS optimizer steps (with a time budget: at most) (default: {steps})" in text  # the method's own default, not TrainConfig's
    assert "--device DEVICE auto, cpu, cuda, cuda:1 ... (default: auto)" in text


def test_building_the_parser_imports_no_recipe():
    import subprocess
    import sys

    code = (
        "import sys; from medalloy.cli import build_parser; p = build_parser(); p.parse_args(['data', 'check', 'X']); p.format_help(); "
        "print(sorted(m for m in sys.modules if m.startswith('medalloy.recipes') or m in ('torch', 'monai')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_version_lives_in_one_place(capsys):
    from pathlib import Path

    import tomllib
    import yaml

    import medalloy

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"medalloy {medalloy.__version__}"
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "medalloy.__version__"}
    assert yaml.safe_load((root / "CITATION.cff").read_text(encoding="utf-8"))["version"] == medalloy.__version__  # kept in step
    assert f"({medalloy.__version__})" in (root / "CHANGELOG.md").read_text(encoding="utf-8") or f"## {medalloy.__version__}" in (
        root / "CHANGELOG.md"
    ).read_text(encoding="utf-8")
