"""Tests of `abkd.cifar.train`: exact resume, refused checkpoints, config errors and a 2-process DDP run."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
import pytest
import torch
from torch import nn
from abkd.cifar.train import TrainConfig, fit
from abkd.training import load_checkpoint


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
    # every field is checked when the configuration is written, the loss's parameters included
    kd = dict(loss="abkd", teacher="resnet32x4")
    for kw, exc, match in ((dict(kd, loss_params=dict(alpha=0.8, beta=float("nan"))), ValueError, "beta must be finite"),
                           (dict(kd, loss_params=dict(alpha=0.8)), ValueError, "needs beta"),
                           (dict(epochs=True), TypeError, "epochs must be an int"),
                           (dict(lr=float("nan")), ValueError, "lr must be finite"),
                           (dict(lr=0.0), ValueError, "lr must be > 0"),
                           (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
                           (dict(milestones=(150, "x")), TypeError, "milestones must be a sequence of epoch numbers"),
                           (dict(amp=1), TypeError, "amp must be True or False")):
        with pytest.raises(exc, match=match):
            TrainConfig("resnet8", **kw)
    assert TrainConfig("resnet8", milestones=[150.0, 180]).milestones == (150, 180)



def test_method_and_recipe_source_are_checked_and_recorded():
    kw = dict(loss="abkd", loss_params=dict(alpha=1.0, beta=0.0), teacher="resnet20")
    cfg = TrainConfig("resnet8", method="fkl_at_abkd_weights", recipe_source="control at ABKD's weights", **kw)
    d = cfg.to_dict()
    assert (d["method"], d["recipe_source"]) == ("fkl_at_abkd_weights", "control at ABKD's weights")
    assert TrainConfig("resnet8", **kw).to_dict()["method"] is None
    # two recipes of one loss are two configurations (ids, checkpoints)
    assert cfg.run_id() != TrainConfig("resnet8", method="abkd", **kw).run_id()
    for bad, exc, match in ((dict(kw, method=3), TypeError, "method must be None or a recipe name"),
                            (dict(kw, method=""), ValueError, "letters, digits"),
                            (dict(kw, method="a/b"), ValueError, "it names run folders"),
                            (dict(method="kd"), ValueError, "loss='ce' trains from labels"),
                            (dict(kw, recipe_source=None), TypeError, "recipe_source must be a str")):
        with pytest.raises(exc, match=match):
            TrainConfig("resnet8", **bad)


def test_checkpoint_of_another_recipe_of_the_same_loss_is_refused(tmp_path):
    fit(TOY, toy_model(), DATA, tmp_path, stop_after=1, progress=False)
    import dataclasses
    with pytest.raises(ValueError, match="another configuration"):
        fit(dataclasses.replace(TOY, recipe_source="another source"), toy_model(), DATA, tmp_path, progress=False)

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



def test_train_epoch_drops_the_last_partial_batch_and_gives_dkd_the_1_based_epoch():
    from abkd.cifar.train import train_epoch
    from abkd.training import epoch_loader
    seen = []
    class Recorder(nn.Module):                           # a KD objective that records what the trainer passes it
        def total(self, s, t, y, epoch=None):
            seen.append((len(y), epoch))
            return nn.functional.cross_entropy(s, y)
    model, teacher = toy_model(), toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = epoch_loader(DATA["train"], 32, 0, 0, drop_last=True)           # 80 = 2·32 + 16: the 16 are dropped
    train_epoch(model, loader, Recorder(), opt, torch.device("cpu"), 2, teacher=teacher, amp=False, progress=False)
    assert seen == [(32, 3), (32, 3)]                   # the 0-based epoch 2 is DKD's epoch 3 at every step
