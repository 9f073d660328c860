"""Tests of `abkd.cifar.experiment`: teacher then student end to end on stand-in files in the real on-disk format, the grid runner, the CLI entry."""
import pytest
import torch
import abkd.cifar.experiment as E
from abkd.cli import main
from abkd.results import load_record, pair_label, paper_number
from abkd.cifar.data import build_synthetic_cifar100
from abkd.cifar.recipes import ALL_PAIRS, method_config, methods_for, recipe, teacher_recipe
from abkd.cifar.train import TrainConfig


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    build_synthetic_cifar100(root, n_train_per_class=2, n_test_per_class=1, seed=0)
    return root


def test_end_to_end_teacher_then_student_on_standin_files(tiny_data, tmp_path):
    tcfg = teacher_recipe("resnet8", epochs=1, batch_size=50)
    trec = E.run_config(tcfg, tiny_data, tmp_path / "teacher", synthetic=True, progress=False)
    assert trec["experiment"] == "cifar100" and trec["metrics"]["epochs_run"] == 1
    assert "git" in trec["provenance"] and trec["config"]["synthetic"] is True
    scfg = TrainConfig("resnet8", loss="abkd", loss_params=dict(alpha=0.8, beta=0.2), teacher="resnet8",
                       teacher_checkpoint=str(tmp_path / "teacher" / "best_model.pt"), epochs=1, batch_size=50,
                       method="abkd", recipe_source="given (a test)")
    srec = E.run_config(scfg, tiny_data, tmp_path / "student", synthetic=True, progress=False)
    assert 0 <= srec["metrics"]["last_test_acc"] <= 100
    assert (srec["config"]["method"], srec["config"]["recipe_source"]) == ("abkd", "given (a test)")
    table = E.results_table([srec, trec])
    assert "resnet8 → resnet8" in table and "ABKD (α=0.8, β=0.2)" in table and "resnet8 (teacher)" in table


def test_grid_search_chooses_on_validation(tiny_data, tmp_path):
    from abkd.cifar.models import create_model
    ck = tmp_path / "resnet56.pt"
    torch.save(create_model("resnet56").state_dict(), ck)          # the standard pair's teacher architecture
    E.grid_search("resnet56", "resnet20", "abkd", tiny_data, tmp_path / "grid", grid=[(0.8, 0.2), (0.9, 0.5)],
                  val_fraction=0.5, teacher_checkpoint=str(ck), overrides=dict(epochs=1, batch_size=100),
                  progress=False)
    rec = load_record(tmp_path / "grid" / "grid.json")
    assert len(rec["metrics"]["points"]) == 2
    assert rec["metrics"]["chosen"]["val_acc"] == max(p["val_acc"] for p in rec["metrics"]["points"])
    assert rec["config"]["chosen_on"].startswith("validation")
    with pytest.raises(ValueError, match="validation split"):
        E.grid_search("resnet56", "resnet20", "abkd", tiny_data, tmp_path / "g2", val_fraction=0.0)


def test_cli_reproduce_cifar100_smoke_path(monkeypatch, tmp_path):
    tiny = dict(E.SMOKE, teacher="resnet8", student="resnet8", seeds=(0,), n_train_per_class=2, n_test_per_class=1,
                teacher_epochs=1, student_epochs=1, milestones=(1,))
    monkeypatch.setattr(E, "SMOKE", tiny)
    monkeypatch.setattr(E.reproduce_smoke, "__defaults__", (tiny, False))
    assert main(["reproduce", "--only", "cifar100", "--out", str(tmp_path)]) == 0
    out = tmp_path / "cifar100"
    assert (out / "table.md").exists() and (out / "teacher" / "result.json").exists()
    assert sorted(p.name for p in (out / "students").iterdir()) == ["abkd_seed0", "fkl_at_abkd_weights_seed0", "kd_seed0"]
    text = (out / "table.md").read_text()
    assert "Smoke scale" in text and "ranks nothing" in text and "fkl_at_abkd_weights (α=1, β=0): CE 1, 32 (2·T²) on D" in text
    rec = load_record(out / "students" / "fkl_at_abkd_weights_seed0" / "result.json")
    assert rec["config"]["method"] == "fkl_at_abkd_weights" and rec["config"]["loss"] == "abkd"
    assert rec["config"]["recipe_source"] == method_config("fkl_at_abkd_weights", "resnet8", "resnet8",
                                                           setting=tiny["setting"])["source"]



def fake_record(teacher, student, method, best, loss=None, loss_params=None):
    "A result record as run_config writes it (config and metrics only), for the table."
    if teacher is None: config = dict(model=student, teacher=None, loss="ce", loss_params={}, method=None)
    else:
        c = method_config(method, teacher, student)
        config = dict(model=student, teacher=teacher, loss=loss or c["loss"], method=method,
                      loss_params=loss_params or c["loss_params"])
    return dict(config=dict(config, best_chosen_on="test"), metrics=dict(last_test_acc=best - 1, best_test_acc=best))


def row_of(table, *cells):
    "The one table row holding every cell of `cells` (as ' | cell |' pieces)."
    rows = [line for line in table.splitlines() if all(f"| {c} |" in line for c in cells)]
    assert len(rows) == 1, (cells, rows)
    return rows[0]


def test_table_shows_weights_the_papers_cell_and_the_difference():
    pair = "resnet56 → resnet20"
    recs = [fake_record("resnet56", "resnet20", "abkd", b) for b in (72.0, 71.6)]
    recs += [fake_record("resnet56", "resnet20", "fkl_at_abkd_weights", b) for b in (71.0, 71.2)]
    recs += [fake_record("resnet56", "resnet20", "kd", 70.0), fake_record(None, "resnet56", None, 72.0),
             fake_record("ResNet50", "vgg8", "abkd", 75.0), fake_record("wrn_40_2", "wrn_16_2", "dkd", 76.0)]
    table = E.results_table(recs)
    ab = paper_number(13, pair, "α-β-divergence")
    abkd = row_of(table, pair, "ABKD (α=0.8, β=0.3)")
    assert "| 1 | 32 (2·T²) | 4 | 2 |" in abkd and "71.80 ± 0.28 [test]" in abkd and f"| {71.8 - ab:+.2f} |" in abkd
    assert f"{ab:.2f} (0.16) [Table 13]" in abkd
    kd = row_of(table, pair, "KD")
    assert "| 0.1 | 14.4 (0.9·T²) | 4 | 1 |" in kd and f"| {70.0 - paper_number(13, pair, 'FKLD'):+.2f} |" in kd
    assert "[cifar100_kd_dkd]" in kd                               # the original repository's number stays beside
    control = row_of(table, pair, "fkl_at_abkd_weights (α=1, β=0)")   # ABKD's loss, its own row
    assert "| 1 | 32 (2·T²) | 4 | 2 |" in control and "the paper has no such column" in control
    teacher = row_of(table, "resnet56 (teacher)")
    assert f"| {72.0 - paper_number(13, pair, 'Teacher'):+.2f} |" in teacher and "[cifar100_teachers]" in teacher
    cross = row_of(table, "ResNet50 → vgg8", "ABKD (α=0.9, β=0.2)")
    assert "[Table 14]" in cross and f"| {75.0 - paper_number(14, 'ResNet50 → vgg8', 'ABKD'):+.2f} |" in cross
    assert "| Fig. 5 only [Fig. 5] | — |" in row_of(table, "wrn_40_2 → wrn_16_2", "DKD")
    assert "Table 13" in table.split("\n\n")[-1] and "Fig. 5" in table.split("\n\n")[-1]


def test_table_rows_not_run_and_stand_in_cells():
    table = E.results_table([], planned=[("resnet20", "resnet8", "rkl_at_abkd_weights"), ("resnet20", "resnet8", "abkd")])
    rkl = row_of(table, "resnet20 → resnet8", "rkl_at_abkd_weights (α=0, β=1)")
    assert "not run" in rkl and f"{paper_number(13, 'resnet56 → resnet20', 'RKLD'):.2f}" in rkl
    assert "[Table 13, resnet56 → resnet20]" in rkl            # the stand-in pair shows the paper pair it uses
    assert "resnet20 (teacher)" in table


def test_weights_on_the_divergence_are_the_papers():
    "The table's weight on D: λ = 32 for ABKD (App. I.2.3, no T²), 0.9·T² = 14.4 for KD, TTM's λ without T."
    from abkd.cifar.recipes import divergence_weight
    for t, s in ALL_PAIRS:
        for m in methods_for(t, s):
            c = method_config(m, t, s)
            T = c["loss_params"].get("temperature")
            assert divergence_weight(c["loss_params"]) == c["kd_weight"] * (T * T if T is not None else 1.0), (t, s, m)
    assert divergence_weight(method_config("abkd", "resnet56", "resnet20")["loss_params"]) == 32
    assert divergence_weight(method_config("kd", "resnet56", "resnet20")["loss_params"]) == pytest.approx(14.4)


def test_smoke_and_paper_presets_include_the_controls():
    assert "fkl_at_abkd_weights" in E.SMOKE["methods"]
    assert all({"fkl_at_abkd_weights", "rkl_at_abkd_weights", "abkd", "kd"} <= set(E.paper_methods(*p))
               for p in E.PAPER["pairs"])
    cfgs = E.smoke_configs("t.pt")
    assert len({E.run_folder(c) for c in cfgs}) == len(cfgs) == len(E.SMOKE["methods"]) * len(E.SMOKE["seeds"])
    assert all(c.method and c.recipe_source for c in cfgs)
    cfg = recipe("resnet56", "resnet20", "rkl_at_abkd_weights")
    assert (cfg.method, cfg.loss, cfg.loss_params["beta"]) == ("rkl_at_abkd_weights", "abkd", 1.0)


def test_paper_plan_covers_every_setting_of_tables_4_13_14():
    from abkd.cifar.recipes import AB_NAMES, METHODS, VARIANTS
    from abkd.results import paper_settings, paper_table
    plan = E.paper_plan()
    assert len(plan) == len(set(plan)) and {(t, s) for t, s, _ in plan} == set(ALL_PAIRS) == set(E.PAPER["pairs"])
    assert not any(m in VARIANTS for _, _, m in plan)
    by_name = {v: k for k, v in AB_NAMES.items()}
    for (row, name) in paper_settings(4):                                   # Table 4: 8 pairs × 4 AB methods
        assert (*row.split(" → "), by_name[name]) in plan
    for row in paper_table(13)["rows"]:                                     # Table 13: FKLD, RKLD, α-β
        assert all((*row.split(" → "), m) in plan for m in ("kd", "rkl_at_abkd_weights", "abkd"))
    for row in paper_table(14)["rows"]:                                     # Table 14: all 8 columns
        assert all((*row.split(" → "), m) in plan for m in METHODS)
    assert E.paper_plan([("resnet32", "resnet20")], ["kd", "dkd"]) == [("resnet32", "resnet20", "kd")]


def test_each_paper_scale_row_gets_its_paper_cell():
    "Every planned row shows the cell of the paper's table it belongs to, looked up here from paper_table directly."
    from abkd.cifar.recipes import METHODS
    from abkd.results import paper_table, published_number
    plan = E.paper_plan()
    table = E.results_table([], planned=plan)
    col13 = {"kd": "FKLD", "rkl_at_abkd_weights": "RKLD", "abkd": "α-β-divergence"}
    n13 = n14 = 0
    for t, s, m in plan:
        row, line = pair_label(t, s), row_of(table, pair_label(t, s), E.method_label(m, method_config(m, t, s)["loss_params"]))
        if row in paper_table(13)["rows"] and m in col13:
            assert f"| {published_number(paper_table(13), row, col13[m], with_std=True)} [Table 13] |" in line; n13 += 1
        elif row in paper_table(14)["rows"] and m in METHODS:
            assert f"| {paper_table(14)['rows'][row][m.upper()]:.2f} [Table 14] |" in line; n14 += 1
        elif m in METHODS: assert "| Fig. 5 only [Fig. 5] |" in line
        else: assert "the paper has no such column" in line
    assert (n13, n14) == (12, 8)
    for t in ("resnet32", "resnet44", "resnet56", "resnet110"):              # Table 13's teacher column
        want = paper_table(13)["rows"][f"{t} → resnet20"]["Teacher"]
        assert f"| {want:.2f} [Table 13, teacher of {t} → resnet20] |" in row_of(table, f"{t} (teacher)")


def test_reproduce_paper_trains_the_unreleased_teachers_first(monkeypatch, tmp_path):
    "resnet32 and resnet44 have no public checkpoint: trained at the paper schedule, their students read the last epoch."
    from abkd.cifar.recipes import paper_schedule
    from abkd.training import CHECKPOINT
    calls = []
    def fake_run(cfg, data_root, out_dir, **kw):
        calls.append((cfg, out_dir))
        c = dict(cfg.to_dict(), best_chosen_on="test")
        return dict(config=c, metrics=dict(last_test_acc=1.0, best_test_acc=2.0))
    monkeypatch.setattr(E, "run_config", fake_run)
    monkeypatch.setattr(E, "teacher_path", lambda name, root: root / f"{name}.pth")
    assert E.teachers_to_train(ALL_PAIRS) == ("resnet32", "resnet44")
    pairs = [("resnet32", "resnet20"), ("resnet56", "resnet20")]
    written = E.reproduce_paper(tmp_path, pairs=pairs, seeds=(0,))
    teacher_cfg, teacher_dir = calls[0]
    assert teacher_cfg.loss == "ce" and teacher_cfg.model == "resnet32" and teacher_cfg.amp is False
    assert {k: getattr(teacher_cfg, k) for k in paper_schedule()} == paper_schedule()
    students = calls[1:]
    assert len(students) == len(E.paper_plan(pairs))
    assert all(c.teacher_checkpoint == str(teacher_dir / CHECKPOINT) for c, _ in students if c.teacher == "resnet32")
    assert all(c.teacher_checkpoint.endswith("resnet56.pth") for c, _ in students if c.teacher == "resnet56")
    text = written[-1].read_text()
    assert "Trained here (no public checkpoint): teachers resnet32;" in text
    assert "| 1 | 1.00 | 2.00 [test] | 71.93 [Table 13, teacher of resnet32 → resnet20] |" in text


def test_smoke_writes_the_accuracy_figure_from_the_records(monkeypatch, tmp_path):
    "The figure is written beside the table and returned; it is drawn from the records on disk (their means)."
    tiny = dict(E.SMOKE, teacher="resnet8", student="resnet8", seeds=(0,), n_train_per_class=2, n_test_per_class=1,
                teacher_epochs=1, student_epochs=1, milestones=(1,), methods=("kd", "abkd"))
    written = E.reproduce_smoke(tmp_path, tiny, progress=False)
    fig = tmp_path / "cifar100" / E.FIGURE
    assert fig in written and fig.stat().st_size > 0 and fig.read_bytes()[:4] == b"\x89PNG"
    recs = [load_record(p) for p in written if p.suffix == ".json"]
    ax = E.accuracy_figure(recs).axes[0]
    means = {r["config"]["method"]: r["metrics"]["best_test_acc"] for r in recs if r["config"]["teacher"]}
    assert sorted(round(p.get_height(), 9) for p in ax.patches) == sorted(round(v, 9) for v in means.values())


def test_run_config_names_its_progress_lines(tiny_data, tmp_path, monkeypatch):
    "Every progress line of a run carries its name ('kd seed 0', 'teacher resnet8')."
    from abkd.training import current_run
    seen = []
    class Stop(Exception): pass
    def fit(*a, **k): seen.append(current_run()); raise Stop
    monkeypatch.setattr(E, "build_teacher", lambda cfg: None)
    monkeypatch.setattr(E, "fit", fit)
    cfg = E.smoke_configs("x.pt", dict(E.SMOKE, seeds=(0,), methods=("kd",)))[0]
    with pytest.raises(Stop): E.run_config(cfg, tiny_data, tmp_path / "r")
    assert seen == ["kd seed 0"] and E.run_label(E.teacher_recipe("resnet8")) == "teacher resnet8"
