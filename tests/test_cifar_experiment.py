"""Tests of `abkd.cifar.experiment`: teacher then student end to end on stand-in files in the real on-disk format, the grid runner, the CLI entry."""
import pytest
import torch
import abkd.cifar.experiment as E
from abkd.cli import main
from abkd.results import load_record
from abkd.cifar.data import build_synthetic_cifar100
from abkd.cifar.recipes import teacher_recipe
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
                       teacher_checkpoint=str(tmp_path / "teacher" / "best_model.pt"), epochs=1, batch_size=50)
    srec = E.run_config(scfg, tiny_data, tmp_path / "student", synthetic=True, progress=False)
    assert 0 <= srec["metrics"]["last_test_acc"] <= 100
    table = E.results_table([srec, trec])
    assert "resnet8 → resnet8" in table and "ABKD (α=0.8, β=0.2)" in table and "paper value not recorded" in table


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
    assert sorted(p.name for p in (out / "students").iterdir()) == ["abkd_seed0", "kd_seed0"]
    assert "Smoke scale" in (out / "table.md").read_text()

