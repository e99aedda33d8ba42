"""benchmarks/experts.py: the cropped variants train on their base dataset's split and get cross rows."""

from __future__ import annotations



from benchmarks import experts as bench


def test_a_variant_is_its_base_dataset_under_other_planner_options() -> None:
    assert bench.dataset_of("Shenzhen-crop128") == "Shenzhen" and bench.dataset_of("ACDC") == "ACDC"
    assert bench.plan_options("Shenzhen-crop128") == {"max_2d_patch": 128}
    assert bench.plan_options("ACDC") == {"max_2d_patch": 128} and bench.plan_options("JSRT") == {}
    # each variant is scored on the other source, as its whole-image expert is
    for name, (base, _) in bench.VARIANTS.items():
        whole = {test for train, test in bench.CROSS if train == base}
        assert {test for train, test in bench.CROSS if train == name} == whole != set()


def test_variant_rows_and_their_cross_rows_are_in_the_table() -> None:
    def row(source: str, dice: float, options: dict | None = None) -> dict:
        r = {"lung": {"dice": dice, "hd95": 10.0}, "source": source, "mean_dice": dice, "train_minutes": 10.0, "steps": 900}
        return {**r, "plan_options": options} if options is not None else r

    rows = {
        "Shenzhen": row("in", 0.95, {}),
        "Shenzhen-crop128": row("in", 0.94, {"max_2d_patch": 128}),
        "Shenzhen->JSRT": row("cross:Shenzhen->JSRT", 0.50),
        "Shenzhen-crop128->JSRT": row("cross:Shenzhen-crop128->JSRT", 0.40),
    }
    md = bench.markdown(rows, 10.0)
    assert "Shenzhen-crop128: max_2d_patch=128 (128x128 crops of the whole images" in md
    assert "| Shenzhen-crop128 | in | lung | 0.940 |" in md
    assert "| Shenzhen-crop128->JSRT | cross:Shenzhen-crop128->JSRT | lung | 0.400 |" in md
