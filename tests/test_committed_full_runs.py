"""The committed full-run records of the two real-data studies (nbs/results/): they are the records of the scales the
code defines now (a changed FULL scale makes them stale, and this says so), complete, within the 45-minute budget of
their issue, and the tables and figures the notebooks show are regenerated from them."""
import dataclasses, json, shutil
from pathlib import Path

import pytest

from abkd.results import load_records
from abkd.studies import real_images as ri
from abkd.studies import real_vocab as rv

RESULTS = Path(__file__).resolve().parents[1] / "nbs" / "results"
BUDGET_S = 45 * 60


def as_json(scale) -> dict:
    "A scale dataclass as its record stores it (tuples become lists)."
    return json.loads(json.dumps(dataclasses.asdict(scale)))


def test_study_a_full_records_match_the_full_scale():
    study = json.loads((RESULTS / "real_images_full" / "study.json").read_text())
    assert study["config"]["scale"] == as_json(ri.FULL), "nbs/results/real_images_full is stale: rerun the full study"
    m = study["metrics"]
    assert m["wall_seconds"] <= BUDGET_S and m["peak_rss_mib"] > 0
    assert set(m["differences"]) == {f"{ab}-{parent}" for ab, parent in ri.AB_PAIRS}
    assert all(d["seeds"] == list(ri.FULL.seeds) for d in m["differences"].values())


def test_study_b_full_records_are_complete_and_regenerate(tmp_path):
    records = load_records(RESULTS / "real_vocab_full")
    by = {}
    for r in records: by.setdefault(r["experiment"], []).append(r)
    assert set(by) == {"real-vocab/loss-memory", "real-vocab/teacher", "real-vocab/student", "real-vocab/study"}
    for r in records:
        assert r["config"]["scale"] == as_json(rv.FULL), "nbs/results/real_vocab_full is stale: rerun the full study"
        assert r["provenance"]["git"]["sha"] and r["provenance"]["hardware"]["torch_threads"] == 2
    want = {(rv.method_key(n, a, b), s) for s in rv.FULL.train_seeds for n, a, b in rv.FULL.methods()}
    assert {(r["config"]["key"], r["seed"]) for r in by["real-vocab/student"]} == want
    assert all(r["config"]["train"]["fused_loss"] for r in by["real-vocab/student"])
    cost = by["real-vocab/study"][0]["metrics"]
    assert cost["runs"] == len(want) + 1 and cost["phase_wall_s"] <= cost["wall_s"] <= BUDGET_S
    root = tmp_path / "real_vocab"
    shutil.copytree(RESULTS / "real_vocab_full", root / "records")
    table, figure = rv.write_outputs(root, rv.FULL)
    text = table.read_text()
    assert f"in {cost['wall_s'] / 60:.1f} min wall" in text and "paired over training seeds" in text
    assert figure.stat().st_size > 0
