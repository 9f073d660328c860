"""The theory experiment (`abkd.theory`): records, tables generated from them and figures; the controlled experiment; the protocol."""
import json
import math

import pytest

from abkd.cli import main
from abkd.theory import (CONTROLLED_COLUMNS, INIT_SEED_OFFSET, METRICS, PAPER, SMOKE, ControlledTask,
                         controlled_experiment, controlled_markdown, evaluate_student, grid_points, paired_interval,
                         paper_choices, plot_ab_plane_with_paper_choices, reproduce, select_and_report, split_draws,
                         student_model, t_quantile, train_students, verdict, write_named_points_table)


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
    assert sum(v["selected"] for v in controlled.values()) == 2            # one selected point per vocabulary size


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
    rows = controlled_experiment(50, [(0.5, 0.5)], draws=(0, 1), steps=60, contexts=32)
    assert rows == controlled_experiment(50, [(0.5, 0.5)], draws=(0, 1), steps=60, contexts=32)
    assert {(r["alpha"], r["beta"], r["draw"]) for r in rows} == {(a, b, d) for a, b in [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)]
                                                                  for d in (0, 1)}
    task = ControlledTask(vocab=50, contexts=32)
    untrained = evaluate_student(student_model(task, 8, INIT_SEED_OFFSET), task)
    assert all(r["top1_agreement"] > untrained["top1_agreement"] + 0.3 for r in rows)
    assert set(METRICS) <= set(rows[0])


def test_students_trained_in_one_batch_equal_students_trained_alone():
    import torch
    from abkd import ab_divergence
    tasks = [ControlledTask(vocab=40, contexts=24, seed=d) for d in (5, 6)]
    together = train_students(tasks, 0.2, 0.7, steps=30, hidden=4, seeds=(11, 12))
    for task, seed, got in zip(tasks, (11, 12), together):
        model = student_model(task, 4, seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(30):
            loss = ab_divergence(model(torch.arange(24)), task.teacher_logits, 0.2, 0.7)
            opt.zero_grad(); loss.backward(); opt.step()
        want = evaluate_student(model, task)
        assert all(abs(got[k] - want[k]) < 1e-5 for k in want), (got, want)


def test_fkl_and_rkl_are_in_every_grid(theory_out):
    for preset in (SMOKE, PAPER):
        for g in preset["controlled"]["grids"].values():
            assert {(1.0, 0.0), (0.0, 1.0)} <= set(grid_points(g["points"]))
    assert grid_points([(0.2, 0.7)]) == [(0.2, 0.7), (1.0, 0.0), (0.0, 1.0)]        # added where a grid lacks them
    assert grid_points([(0, 1), (0.2, 0.7), (1, 0)]) == [(0.0, 1.0), (0.2, 0.7), (1.0, 0.0)]   # never twice
    rec = json.loads((theory_out / "theory" / "controlled.json").read_text())
    for V in rec["config"]["grids"]:
        points = {(m["alpha"], m["beta"]) for m in rec["metrics"].values() if m["vocab"] == int(V)}
        assert {(1.0, 0.0), (0.0, 1.0)} <= points
    assert (0.2, 0.7) in {(m["alpha"], m["beta"]) for m in rec["metrics"].values() if m["vocab"] == 10_000}


def test_selection_and_report_draws_are_disjoint(theory_out):
    with pytest.raises(ValueError, match="report_draws must be an integer ≥ 2"):
        split_draws(0, 2, 1)
    d = split_draws(7, 2, 3)
    assert d == {"selection": [7, 8], "report": [9, 10, 11]}
    with pytest.raises(ValueError, match="selection and report draws overlap"):
        select_and_report([], {"selection": [0, 1], "report": [1, 2]})
    rec = json.loads((theory_out / "theory" / "controlled.json").read_text())
    for V, g in rec["config"]["grids"].items():
        sel, rep = g["draws"]["selection"], g["draws"]["report"]
        assert len(sel) >= 2 and len(rep) >= 2 and not set(sel) & set(rep)
        for m in (m for m in rec["metrics"].values() if m["vocab"] == int(V)):
            assert sorted(m["draws"]) == sorted(map(str, sel + rep))
            for k in METRICS:                                      # reported numbers: the report draws only
                vals = [m["draws"][str(r)][k] for r in rep]
                assert abs(m["report"][k]["mean"] - sum(vals) / len(vals)) < 1e-12 and m["report"][k]["n"] == len(rep)
            sel_comp = [(m["draws"][str(s)]["top1_agreement"] * m["draws"][str(s)]["mode_recall"]) ** 0.5 for s in sel]
            assert abs(m["selection_composite"] - sum(sel_comp) / len(sel_comp)) < 1e-12


def _row(a, b, d, top1, recall):
    return dict(vocab=10, alpha=a, beta=b, draw=d, top1_agreement=top1, mode_recall=recall, target_prob=0.5, entropy_gap=0.0)


def test_selection_uses_the_selection_draws_and_ties_are_reported_as_ties():
    draws = {"selection": [0, 1], "report": [2, 3, 4]}
    # A wins on the selection draws; on the report draws B is clearly better, C equals A exactly, D is clearly worse
    quality = {(1.0, 0.0): [0.9, 0.9, 0.50, 0.52, 0.51], (0.0, 1.0): [0.5, 0.5, 0.90, 0.91, 0.92],
               (0.5, 0.5): [0.4, 0.4, 0.50, 0.52, 0.51], (0.2, 0.7): [0.3, 0.3, 0.20, 0.21, 0.19]}
    rows = [_row(a, b, d, 1.0, q[d] ** 2) for (a, b), q in quality.items() for d in range(5)]
    cells = {(c["alpha"], c["beta"]): c for c in select_and_report(rows, draws)}
    assert [p for p, c in cells.items() if c["selected"]] == [(1.0, 0.0)]
    assert abs(cells[(1.0, 0.0)]["report"]["composite"]["mean"] - 0.51) < 1e-12          # not the 0.9 that selected it
    assert {p: verdict(c["delta_composite"]) for p, c in cells.items() if not c["selected"]} == \
        {(0.0, 1.0): "above", (0.5, 0.5): "tie", (0.2, 0.7): "below"}
    rec = {"seed": 0, "config": {"scale": "test", "lr": 0.05, "grids": {"10": dict(
        contexts=4, hidden=2, steps=1, draws=draws, teacher_target_prob=0.5)}},
        "metrics": {f"{p}": dict(vocab=10, **c) for p, c in cells.items()}}
    text = controlled_markdown(rec)
    assert "ties with 1 point(s): (0.5, 0.5)" in text and "| tie |" in text and "| above |" in text


def test_paired_interval_and_t_quantiles():
    import math
    for p in (0.9, 0.975):
        assert abs(t_quantile(p, 1) - math.tan(math.pi * (p - 0.5))) < 1e-9                # Cauchy
        u = 2 * p - 1
        assert abs(t_quantile(p, 2) - u * math.sqrt(2 / (1 - u * u))) < 1e-9              # closed form, df 2
    assert abs(t_quantile(0.975, 4) - 2.7764451) < 1e-6                                     # printed tables
    d = paired_interval([0.1, 0.2, 0.3])                 # mean 0.2, s 0.1: half width 4.303 · 0.1/√3 = 0.248
    assert abs(d["half_width"] - t_quantile(0.975, 2) * 0.1 / math.sqrt(3)) < 1e-12 and abs(d["mean"] - 0.2) < 1e-12
    assert verdict(d) == "tie"                           # a mean 2 s from 0 is still within the interval at n = 3
    assert verdict(paired_interval([0.1, 0.2, 0.15])) == "below"        # half width 0.124 < 0.15
    assert verdict(paired_interval([0.0, 0.0])) == "tie"
    assert verdict(paired_interval([0.05, -0.04, 0.02])) == "tie"
    with pytest.raises(ValueError, match="at least 2 differences"):
        paired_interval([0.1])


def test_controlled_table_defines_every_column(theory_out):
    text = (theory_out / "theory" / "controlled.md").read_text()
    headers = [line for line in text.splitlines() if line.startswith("| (α, β) |")]
    assert len(headers) == 2                                                # one table per vocabulary size
    for col in (c.strip() for c in headers[0].strip("|").split("|")):
        assert f"- `{col}`: " in text, col
    assert "√(top1_agreement · mode_recall)" in text and "H(q_i) − H(p_i)" in text
    assert "Selection draws [0, 1], report draws [2, 3, 4] (disjoint)" in text
    assert list(CONTROLLED_COLUMNS) == [c.strip() for c in headers[0].strip("|").split("|")]


def test_controlled_table_is_generated_from_the_record(theory_out):
    rec = json.loads((theory_out / "theory" / "controlled.json").read_text())
    key = next(k for k, m in rec["metrics"].items() if m["alpha"] == 1.0 and m["beta"] == 0.0 and m["vocab"] == 100)
    rec["metrics"][key]["report"]["entropy_gap"]["mean"] = 12.3456
    assert "12.346 ± " in controlled_markdown(rec)


def test_ab_plane_marks_the_papers_choices_by_table():
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    assert paper_choices(7) == [(0.2, 0.7)]
    assert (0.5, 0.5) in paper_choices(4) and (1.2, -0.1) not in paper_choices(4)         # ABKD column only
    fig = plot_ab_plane_with_paper_choices()
    labels = fig.axes[0].get_legend_handles_labels()[1]
    plt.close(fig)
    assert sum(label.startswith("paper Table") for label in labels) == 3


def test_presets_and_an_unknown_scale(tmp_path):
    assert set(SMOKE) == set(PAPER) == {"named_points", "claim_draws", "controlled"}
    assert PAPER["named_points"]["vocab"] == 50_257 and PAPER["claim_draws"] > SMOKE["claim_draws"]
    with pytest.raises(ValueError, match="scale must be 'smoke' or 'paper', got 'huge'"):
        reproduce(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()


def test_paired_seed_difference_on_shared_seeds():
    from abkd.theory import paired_seed_difference
    d = paired_seed_difference({0: 1.0, 1: 2.0, 2: 4.0, 9: 100.0}, {0: 0.5, 1: 1.0, 2: 3.0})
    assert d["seeds"] == [0, 1, 2] and d["differences"] == [0.5, 1.0, 1.0] and d["mean"] == pytest.approx(2.5 / 3)
    s = math.sqrt(((0.5 - 2.5 / 3) ** 2 + 2 * (1.0 - 2.5 / 3) ** 2) / 2)
    hw = 4.302652729911275 * s / math.sqrt(3)                                     # t_{0.975, 2} · s/√n
    assert d["half_width"] == pytest.approx(hw) and d["low"] == pytest.approx(2.5 / 3 - hw)
    one = paired_seed_difference({0: 1.0}, {0: 0.25})
    assert one["mean"] == 0.75 and one["half_width"] is None and "low" not in one
    assert paired_seed_difference({0: 1.0}, {1: 1.0}) is None
