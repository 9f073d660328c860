"""CIFAR-100 pipeline: trainer (exact resume, checkpoints), recipes, teacher registry, end-to-end runs on stand-in
data in the real on-disk format, the grid runner, the results table, the CLI entry and a 2-process DDP run."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import abkd.cifar.experiment as E
from abkd.cli import main
from abkd.results import load_record
from abkd.cifar.data import build_synthetic_cifar100
from abkd.cifar.recipes import (METHODS, PAIRS, load_state_dict_file, method_params, recipe, teacher_path,
                                 teacher_registry, teacher_recipe)
from abkd.cifar.train import TrainConfig, fit, load_checkpoint, make_loss

ROOT = Path(__file__).resolve().parent.parent


class Noisy(torch.utils.data.Dataset):
    "Features with a class signal plus fresh noise from the global RNG on every access (an augmentation)."
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 5, (n,), generator=g)
        self.x = torch.randn(n, 12, generator=g) + 2 * nn.functional.one_hot(self.y, 12).float()
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return self.x[i] + 0.3 * torch.randn(12), self.y[i]


TOY = TrainConfig("toy", epochs=5, batch_size=16, lr=0.1, milestones=(3,), num_classes=5)
DATA = dict(train=Noisy(80, 0), val=Noisy(24, 1), test=Noisy(30, 2))


def toy_model():
    torch.manual_seed(0)
    return nn.Linear(12, 5)


def test_resume_continues_exactly(tmp_path):
    full = fit(TOY, toy_model(), DATA, tmp_path / "a", progress=False)
    for k in (1, 2):                                   # interrupt after 1 epoch, then after 2 more
        part = fit(TOY, toy_model(), DATA, tmp_path / "b", stop_after=k, progress=False)
        assert not part["finished"]
    resumed = fit(TOY, toy_model(), DATA, tmp_path / "b", progress=False)
    assert resumed["finished"] and resumed["history"] == full["history"]
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["best_chosen_on"] == "val"
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 5 and not list((tmp_path / "b").glob("*.tmp"))


def test_checkpoint_of_another_config_or_corrupt_is_refused(tmp_path):
    fit(TOY, toy_model(), DATA, tmp_path, stop_after=1, progress=False)
    other = TrainConfig("toy", epochs=6, batch_size=16, lr=0.1, milestones=(3,), num_classes=5)
    with pytest.raises(ValueError, match="another configuration"):
        fit(other, toy_model(), DATA, tmp_path, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path / "checkpoint.pt", TOY)


def test_train_config_errors():
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig("resnet8", loss="kd")
    with pytest.raises(ValueError, match="loss must be"):
        TrainConfig("resnet8", loss="crd")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig("resnet8", epochs=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig("resnet8", val_fraction=1.0)


def test_recipes_complete_for_every_pair_and_method():
    assert len(PAIRS) == 11 and len(METHODS) == 8
    for t, s in PAIRS:
        for m in METHODS:
            cfg = recipe(t, s, m)
            assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.milestones) == \
                (240, 64, 0.9, 5e-4, (150, 180, 210))
            assert cfg.lr == (0.01 if s in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
            assert make_loss(cfg) is not None                       # every preset builds its loss
    assert method_params("dkd", "resnet56", "resnet20")["nckd_weight"] == 2.0
    assert method_params("dkd", "resnet32x4", "resnet8x4")["nckd_weight"] == 8.0
    assert method_params("abttm", "vgg13", "vgg8", (0.9, 0.5)) == dict(alpha=0.9, beta=0.5)


def test_teacher_registry_and_checkpoint_checks(tmp_path):
    reg = teacher_registry()
    assert set(reg) == {"resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50"}
    assert reg["resnet32x4"].published_acc == 79.42
    with pytest.raises(FileNotFoundError, match="cifar_teachers.tar"):
        teacher_path("resnet56", tmp_path)
    f = tmp_path / reg["resnet56"].file
    f.parent.mkdir(parents=True)
    from abkd.cifar.models import create_model
    torch.save({"model": create_model("resnet56").state_dict()}, f)      # mdistiller's format
    assert teacher_path("resnet56", tmp_path) == f
    cfg = recipe("resnet56", "resnet20", "kd", teacher_checkpoint=str(f))
    assert isinstance(E.build_teacher(cfg), nn.Module)
    bad = recipe("resnet110", "resnet32", "kd", teacher_checkpoint=str(f))   # a resnet56 file for a resnet110
    with pytest.raises(ValueError, match="does not fit"):
        E.build_teacher(bad)
    f.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="sha256"):
        teacher_path("resnet56", tmp_path)
    with pytest.raises(ValueError, match="unreadable"):
        load_state_dict_file(f)


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


def test_two_process_ddp_run(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys, json, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from accelerate import Accelerator
        from test_cifar_train import TOY, DATA, toy_model
        from abkd.cifar.train import fit
        acc = Accelerator(cpu=True)
        res = fit(TOY, toy_model(), DATA, {str(tmp_path / 'run')!r}, progress=False, accelerator=acc)
        if acc.is_main_process:
            print("RESULT", json.dumps(dict(n=acc.num_processes, epochs=res["epochs_run"], acc=res["last_test_acc"])))
    """))
    # torchrun sets the process-group environment that Accelerator reads (gloo on the CPU)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][0]
    res = json.loads(line.split(" ", 1)[1])
    assert res["n"] == 2 and res["epochs"] == TOY.epochs
    assert (tmp_path / "run" / "checkpoint.pt").exists()
