"""The theory experiment (`abkd.theory`): records, tables generated from them and figures; the controlled experiment; the protocol."""
import json

import pytest

from abkd.cli import main
from abkd.theory import (PAPER, SMOKE, ControlledTask, controlled_experiment, evaluate_student, reproduce, student_model,
                         write_named_points_table)


THEORY_FILES = ["ab_plane.png", "claims.json", "claims.md", "claims_concentration.png", "claims_fkl_rkl.png",
                "concentration_heatmaps.png", "controlled.json",
                "controlled.md", "controlled_V100.png", "controlled_V10000.png", "first_order_error.json",
                "first_order_error.md", "first_order_error.png", "mass_reallocation.png", "named_points.json",
                "named_points.md"]


@pytest.fixture(scope="module")
def theory_out(tmp_path_factory):
    "One run of the main job's theory experiment at smoke scale, shared by the tests below."
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--only", "theory", "--out", str(out)]) == 0
    return out


def test_reproduce_theory_writes_records_tables_and_figures(theory_out):
    out = theory_out / "theory"
    assert sorted(p.name for p in out.iterdir()) == THEORY_FILES          # nothing else (no temporary files)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    for rec_path in out.glob("*.json"):
        rec = json.loads(rec_path.read_text())
        assert {"git", "versions", "hardware"} <= set(rec["provenance"]) and rec["seed"] == 0


def test_theory_claims_hold_in_the_written_record(theory_out):
    m = json.loads((theory_out / "theory" / "claims.json").read_text())["metrics"]
    assert m["a_fkl_error_alone"]["fkl_worst_gap"] < 1e-3
    b = m["b_rkl_confidence_order"]
    assert b["under_holds"] + b["over_holds"] == b["draws"]
    assert m["c_tail_regime"]["confidence_increases_with_beta"] == m["c_tail_regime"]["draws"]
    slopes = json.loads((theory_out / "theory" / "first_order_error.json").read_text())["metrics"]
    assert all(abs(v["slope"] - 2) < 0.05 for v in slopes.values())
    controlled = json.loads((theory_out / "theory" / "controlled.json").read_text())["metrics"]
    assert sum(v["best"] for v in controlled.values()) == 2                # one best point per vocabulary size


def test_named_points_record_and_table(theory_out):
    out = theory_out / "theory"
    rec = json.loads((out / "named_points.json").read_text())
    assert rec["experiment"] == "theory/named_points"
    assert len(rec["metrics"]) >= 8 and all(m["rel_gap"] < 1e-12 for m in rec["metrics"].values())
    assert (out / "ab_plane.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "named_points.md").read_text()
    for name, m in rec["metrics"].items():
        assert name in table and f"{m['closed_form']:.12g}" in table


def test_table_is_generated_from_the_record(theory_out, tmp_path):
    rec_path = tmp_path / "named_points.json"
    rec = json.loads((theory_out / "theory" / "named_points.json").read_text())
    rec["metrics"]["forward KL"]["closed_form"] = 123.456
    rec_path.write_text(json.dumps(rec))
    text = write_named_points_table(rec_path, tmp_path / "t.md").read_text()
    assert "123.456" in text


def test_controlled_experiment_is_deterministic_and_learns():
    rows = controlled_experiment(50, (1.0, 0.5), (0.0, 0.5), steps=60, contexts=32)
    again = controlled_experiment(50, (1.0, 0.5), (0.0, 0.5), steps=60, contexts=32)
    assert rows == again
    task = ControlledTask(vocab=50, contexts=32)
    untrained = evaluate_student(student_model(task), task)
    assert all(r["top1_agreement"] > untrained["top1_agreement"] + 0.3 for r in rows)
    assert {"target_prob", "top1_agreement", "mode_recall", "entropy_gap"} <= set(rows[0])


def test_presets_and_an_unknown_scale(tmp_path):
    assert set(SMOKE) == set(PAPER) == {"named_points", "claim_draws", "controlled"}
    assert PAPER["named_points"]["vocab"] == 50_257 and PAPER["claim_draws"] > SMOKE["claim_draws"]
    with pytest.raises(ValueError, match="scale must be 'smoke' or 'paper', got 'huge'"):
        reproduce(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()
