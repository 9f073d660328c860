"""Every row of the bad-input table (tests/bad_inputs.py): the error it must raise, or its documented result."""
import pytest

from bad_inputs import CASES, run_case


def test_table_covers_every_entry_point():
    entries = {c.entry for c in CASES}
    for expected in ("ab_divergence(impl='auto')", "ab_divergence(impl='chunked')", "ab_divergence(impl='reference')",
                     "ABDivergence", "ab_divergence_from_hidden", "cifar TrainConfig", "CLIPTrainConfig",
                     "LLMTrainConfig", "abkd.cli.main"):
        assert expected in entries
    import abkd
    from abkd.vision_losses import VISION_LOSSES
    assert {f"get_loss({n!r})" for n in abkd.available()} <= entries
    assert {f"get_vision_loss({n!r})" for n in VISION_LOSSES} <= entries


def test_rows_are_distinct():
    keys = [(c.entry, c.case) for c in CASES]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry} | {c.case}" for c in CASES])
def test_bad_input(case):
    ok, result = run_case(case)
    assert ok, f"{case.entry} | {case.case}: {result}"
