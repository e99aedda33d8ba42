"""The pretrain recipe's parts without training: its spec (and the record before specs), its split
(a resumed run keeps its own, of either shape) and what the registry does with its checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_inputs import FIXTURES, fixture

from medalloy.data.reports import read_report_pairs, split_by_patient
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.distributed import DistInfo
from medalloy.errors import MedalloyError
from medalloy.recipes.pretrain import PretrainConfig, PretrainRecipe, PretrainSpec, build_pretrained, load_pretrained
from medalloy.recipes.scaffold import Run
from medalloy.recipes.spec import read_spec
from medalloy.seeding import seed_everything

PRETRAIN = FIXTURES / "pretrain.safetensors"  # its record (the large tensors are rebuilt by fixture())


def test_the_record_before_specs_migrates_to_the_spec_a_run_writes():
    tensors, record = ckpt.load_checkpoint(PRETRAIN)
    spec = read_spec(PretrainSpec, record, PRETRAIN, tensors.keys())
    assert spec.to_record() == {
        "method": "pretrain", "version": 1, "network": record["plan"]["network"], "in_channels": 1, "out_channels": 1, "text_encoder": "scratch",
        **record["model"],
    }  # fmt: skip
    three = {**record, "plan": {**record["plan"], "label_values": [0, 1, 2]}}  # a dataset's plan given to pretraining
    assert read_spec(PretrainSpec, three, PRETRAIN).out_channels == 3


def test_out_channels_decide_the_seeded_weights_of_the_image_encoder():
    """The encoder is cut from a U-Net of the plan's classes: a spec that dropped them would start
    a run given a dataset's plan from other weights than before specs."""
    spec = read_spec(PretrainSpec, ckpt.read_record(PRETRAIN), PRETRAIN)

    def encoder(out_channels: int) -> dict[str, torch.Tensor]:
        seed_everything(0)
        return build_pretrained(spec.model_copy(update={"out_channels": out_channels})).image.state_dict()

    one, three = encoder(1), encoder(3)
    assert one.keys() == three.keys() and all(torch.equal(one[k], encoder(1)[k]) for k in one)
    assert not all(torch.equal(one[k], three[k]) for k in one if k.endswith("conv.weight"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from medalloy.data.synth_reports import generate_report_pairs

    return generate_report_pairs(tmp_path_factory.mktemp("reports"), n_cases=8, text_only=0, size=32, progress=False) / "pairs.csv"


def _split(pairs, out, resume: bool) -> dict:
    recipe = PretrainRecipe(PretrainConfig(text_encoder="scratch"), pairs, progress=False)
    recipe.check()
    return recipe.choose_split(Run(out=out, dist=DistInfo(), resume=resume, progress=False))


def test_split_json_is_the_one_schema_and_a_resumed_run_keeps_its_own_of_either_shape(pairs, tmp_path):
    table = read_report_pairs(pairs)
    train, val = split_by_patient(table.pairs, PretrainConfig().val_fraction, 0)
    fresh = _split(pairs, tmp_path, resume=False)
    assert fresh == {
        "fold": None,
        "datasets": {"pairs": {"train": [p.row for p in train], "val": [p.row for p in val]}},
        "val_patients": sorted({p.patient for p in val}),
        "skipped": {},
    }
    rows = [p.row for p in table.pairs]
    own = {"train": rows[2:], "val": rows[:2]}  # not what the seed would draw
    patients = sorted({p.patient for p in table.pairs[:2]})
    (tmp_path / "split.json").write_text(json.dumps({**own, "val_patients": patients, "skipped": {}}))  # written before the one schema
    kept = _split(pairs, tmp_path, resume=True)
    assert kept == {"fold": None, "datasets": {"pairs": own}, "val_patients": patients, "skipped": {}}
    (tmp_path / "split.json").write_text(json.dumps(kept))
    assert _split(pairs, tmp_path, resume=True) == kept
    assert _split(pairs, tmp_path, resume=False) == fresh  # a new run draws its own


def test_a_pretrain_run_predicts_no_masks_but_loads_as_an_image_text_model(tmp_path):
    from medalloy.predict import load_model
    from medalloy.recipes.registry import load_image_text_model, register_image_text, registered

    whole = fixture("pretrain", tmp_path)
    with pytest.raises(MedalloyError, match=r"pretrain.safetensors: a 'pretrain' model predicts no masks; use it with zeroshot, caption") as exc:
        load_model(whole)
    assert "\n" not in str(exc.value) and "pretrain" not in registered()  # the mask predictors only
    model, enc_tok, dec_tok, record = load_image_text_model(whole)
    direct = load_pretrained(whole)
    assert record == direct[3] and enc_tok.to_json() == direct[1].to_json() and dec_tok.to_json() == direct[2].to_json()
    for k, v in model.state_dict().items():
        assert torch.equal(v, direct[0].state_dict()[k]), k
    expert = ckpt.save_checkpoint(tmp_path / "expert.safetensors", {"w": torch.zeros(1)}, {"method": "expert"})
    with pytest.raises(MedalloyError, match=r"expert.safetensors: checkpoint is for method 'expert', not 'pretrain'"):
        load_image_text_model(expert)
    with pytest.raises(ValueError, match="registered already"):
        register_image_text("pretrain", lambda path, device: None)
