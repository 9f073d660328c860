"""Study A (real images, Fashion-MNIST): the study end to end at a tiny setting on the real data through the generic
image path, the paired-difference interval against an independent computation (mpmath's Student-t), the tables and
figure generated from the records on disk, the paper's cells read through abkd.results, and bad input."""
import dataclasses, json, math, re
from pathlib import Path

import mpmath
import pytest

from abkd.results import paper_number
from abkd.training import DataNotFoundError
from abkd.studies import real_images as ri

TINY = dataclasses.replace(ri.REDUCED, name="tiny", train_per_class=20, test_per_class=10, teacher_epochs=1, epochs=1,
                           seeds=(0, 1), methods=("kd", "abkd"), ab_grid=((0.8, 0.3), (1.0, 0.2)))


def t_quantile_mpmath(p: float, df: int) -> float:
    "Student-t p-quantile from mpmath: solve 1 − ½·I_{df/(df+x²)}(df/2, ½) = p (regularized incomplete beta)."
    cdf = lambda x: 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + x * x), regularized=True) / 2
    return float(mpmath.findroot(lambda x: cdf(x) - p, 2.0))


def independent_interval(d: list) -> tuple:
    "(mean, half width) of the 95 % paired t interval, written out here."
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, t_quantile_mpmath(0.975, n - 1) * sd / math.sqrt(n)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    files = ri.reproduce(out, TINY, progress=False)
    return out / "real_images", files


def test_t_quantile_table_values():
    # printed t tables: t_{0.975, 1} = 12.706, t_{0.975, 2} = 4.303, t_{0.975, 4} = 2.776
    for df, table in ((1, 12.706), (2, 4.303), (4, 2.776)):
        assert abs(t_quantile_mpmath(0.975, df) - table) < 5e-4


@pytest.mark.parametrize("d", [[1.0, 2.0, 3.0], [0.4, -1.3], [2.5, -0.5, 1.25, 0.0, -3.0]])
def test_paired_difference_matches_independent(d):
    students = [dict(seed=s, metrics=dict(best_test_acc=70.0), config=dict(method="kd")) for s in range(len(d))]
    students += [dict(seed=s, metrics=dict(best_test_acc=70.0 + x), config=dict(method="abkd")) for s, x in enumerate(d)]
    got = ri.paired_difference(students, "abkd", "kd")
    mean, hw = independent_interval(d)
    assert got["seeds"] == list(range(len(d)))
    assert abs(got["mean"] - mean) < 1e-9 and abs(got["half_width"] - hw) < 1e-6
    assert abs(got["low"] - (mean - hw)) < 1e-6 and abs(got["high"] - (mean + hw)) < 1e-6
    expected = ("AB higher" if mean - hw > 0 else "AB lower" if mean + hw < 0 else "not resolved")
    assert ri.difference_verdict(got).startswith(expected)


def test_paired_difference_uses_common_seeds_only():
    rec = lambda m, s, a: dict(seed=s, metrics=dict(best_test_acc=a), config=dict(method=m))
    students = [rec("kd", 0, 60.0), rec("kd", 1, 61.0), rec("abkd", 1, 64.0), rec("abkd", 2, 99.0)]
    got = ri.paired_difference(students, "abkd", "kd")
    assert got["seeds"] == [1] and got["differences"] == [3.0] and got["half_width"] is None
    assert ri.difference_verdict(got) == "one seed: no interval"
    assert ri.paired_difference(students, "abdkd", "dkd") is None


def test_study_end_to_end_tiny(tiny_study):
    root, files = tiny_study
    for f in files: assert Path(f).is_file(), f
    names = {Path(f).name for f in files}
    assert {"study.json", "table.md", "figure.png", "grid.json", "result.json"} <= names
    assert Path(root / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # real Fashion-MNIST in ImageFolder layout, the tiny subset
    train = root / "data" / "train"
    assert sorted(len(list(c.glob("*.png"))) for c in train.iterdir() if c.is_dir()) == [20] * 10
    # the grid chose one of its points on validation; the kd and abkd runs per seed exist at that point
    grid = read_json(root / "run" / "students" / "abkd" / "grid.json")["metrics"]
    best = max(grid["points"], key=lambda p: p["val_acc"])
    assert (grid["chosen"]["alpha"], grid["chosen"]["beta"]) == (best["alpha"], best["beta"])
    folder = root / "run" / "students" / "abkd" / f"alpha{best['alpha']:g}_beta{best['beta']:g}"
    acc = {m: {s: read_json(base / f"seed{s}" / "result.json")["metrics"]["best_test_acc"] for s in (0, 1)}
           for m, base in (("kd", root / "run" / "students" / "kd"), ("abkd", folder))}
    d = [acc["abkd"][s] - acc["kd"][s] for s in (0, 1)]
    mean, hw = independent_interval(d)
    study = read_json(root / "study.json")
    rec = study["metrics"]["differences"]["abkd-kd"]
    assert rec["differences"] == pytest.approx(d) and rec["mean"] == pytest.approx(mean)
    assert rec["half_width"] == pytest.approx(hw, rel=1e-6)
    assert study["metrics"]["wall_seconds"] > 0 and study["metrics"]["peak_rss_mib"] > 0
    assert study["metrics"]["runs"] == 5                    # kd × 2 seeds, abkd: 2 grid points + 1 more seed
    table = (root / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| ABKD − KD |"))
    assert f"{mean:+.2f}" in row and f"[{mean - hw:+.2f}, {mean + hw:+.2f}]" in row and "12.706 (df 1)" in row
    assert "Fig. 5 prints no number" in row                 # the paper prints no KD / ABKD number for this pair
    assert "Verdict" in table and "CIFAR-100" in table and "peak resident memory" in table


def test_outputs_are_generated_from_records(tiny_study):
    root, _ = tiny_study
    path = root / "run" / "students" / "kd" / "seed1" / "result.json"
    original = path.read_text()
    try:
        rec = json.loads(original)
        rec["metrics"]["best_test_acc"] = 0.5                 # a value no run produced
        path.write_text(json.dumps(rec))
        ri.write_outputs(root, TINY)
        table = (root / "table.md").read_text()
        kd_row = next(line for line in table.splitlines() if line.startswith("| KD |"))
        kd0 = read_json(root / "run" / "students" / "kd" / "seed0" / "result.json")["metrics"]["best_test_acc"]
        mean = (kd0 + 0.5) / 2
        assert f"{mean:.2f} ± {abs(kd0 - 0.5) / math.sqrt(2):.2f}" in kd_row
    finally:
        path.write_text(original)
        ri.write_outputs(root, TINY)


def test_rerun_resumes_without_training(tiny_study):
    root, _ = tiny_study
    results = sorted((root / "run" / "students").rglob("result.json"))
    before = {p: p.read_text() for p in results}
    ri.reproduce(root.parent, TINY, progress=False)
    assert {p: p.read_text() for p in results} == before


def test_paper_cells_through_results():
    row = "resnet56 → resnet20"
    assert ri.paper_cell("fkl_at_abkd_weights")[0] == paper_number("13", row, "FKLD")
    assert ri.paper_cell("rkl_at_abkd_weights")[0] == paper_number("13", row, "RKLD")
    diff, src = ri.paper_difference("abkd", "fkl_at_abkd_weights")
    assert diff == pytest.approx(paper_number("13", row, "α-β-divergence") - paper_number("13", row, "FKLD"))
    assert "Table 13" in src
    assert ri.paper_difference("abkd", "kd")[0] is None     # Fig. 5: bar charts, no printed number
    assert ri.paper_difference("abdkd", "dkd")[0] is None


def test_scales():
    for s in (ri.REDUCED, ri.FULL):
        run = ri.study_run(s, "/nonexistent")
        assert run.methods == ri.STUDY_METHODS and len(run.seeds) >= 3 and (0.8, 0.3) in run.ab_grid
    assert ri.FULL.train_per_class > ri.REDUCED.train_per_class and ri.FULL.epochs > ri.REDUCED.epochs
    assert ri.resolve_scale("smoke") is ri.REDUCED and ri.resolve_scale("paper") is ri.FULL
    with pytest.raises(ValueError, match="reduced"):
        ri.resolve_scale("huge")


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(DataNotFoundError, match=re.escape("apt-get install dataset-fashion-mnist")):
        ri.export_fashion_mnist(ri.REDUCED, tmp_path / "out", fashion_root=tmp_path)


def test_method_runs_refuses_ambiguous_folders(tmp_path):
    for sub in ("alpha0.8_beta0.3", "alpha1_beta0.2"):
        p = tmp_path / "students" / "abkd" / sub / "seed0"
        p.mkdir(parents=True)
        (p / "result.json").write_text("{}")
    with pytest.raises(ValueError, match="grid.json"):
        ri.method_runs(tmp_path, "abkd")
