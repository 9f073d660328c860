"""Tests of `abkd.training`: seeds, seeded epochs, the epochs-to-run bound, checkpoints (atomic, config check,
unreadable files, exact restore, the resume line), the teacher, the non-finite-loss guard, progress, the single-process
forms, and the missing-input error."""
import hashlib
import random
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
from torch import nn

from abkd.training import (CHECKPOINT, Checkpoint, DataNotFoundError, Processes, check_finite, checkpoint_epoch,
                           epoch_loader, epoch_seed, epochs_to_run, inputs_hint, load_checkpoint, load_pretrained,
                           mixed_precision, prepare_teacher, progress_bar, resolve_device, resume_line,
                           save_checkpoint, seed_everything)


@dataclass
class Cfg:
    seed: int = 0
    lr: float = 0.1
    def to_dict(self): return asdict(self)


class Jitter(torch.utils.data.Dataset):
    "Items whose every access draws from the global torch RNG (an augmentation)."
    def __len__(self): return 12
    def __getitem__(self, i): return torch.tensor(float(i)) + 0.01 * torch.randn(())


def test_epoch_seed_is_fixed_63_bit_sha256():
    assert epoch_seed(0, 0) == 6956993988634818902
    for s, e in [(0, 1), (10, 3), (12345, 239)]:
        v = epoch_seed(s, e)
        assert v == int.from_bytes(hashlib.sha256(f"{s}:{e}".encode()).digest()[:8], "little") >> 1
        assert 0 <= v < 2**63
    assert len({epoch_seed(0, e) for e in range(100)}) == 100


def test_seed_everything_seeds_every_stream():
    def draws():
        g = torch.Generator()
        seed_everything(epoch_seed(3, 4), g)
        return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random(), torch.rand(2, generator=g).tolist()
    assert draws() == draws()


def test_epoch_loader_repeats_an_epoch_exactly():
    order = lambda seed, epoch: torch.cat(list(epoch_loader(Jitter(), 5, seed, epoch)))
    assert torch.equal(order(1, 2), order(1, 2))
    assert not torch.equal(order(1, 2), order(1, 3)) and not torch.equal(order(1, 2), order(2, 2))
    assert sorted(order(1, 2).round().int().tolist()) == list(range(12))          # a shuffle, nothing dropped


def test_epoch_loader_drop_last_keeps_only_full_batches():
    batches = lambda size, drop: [len(b) for b in epoch_loader(Jitter(), size, 0, 0, drop_last=drop)]
    assert batches(5, True) == [5, 5]                     # 12 items: the last 2 dropped, as the official loaders do
    assert batches(5, False) == [5, 5, 2]
    assert batches(20, True) == [12]                      # a set smaller than one batch still trains (Dassl's rule)


def test_epochs_to_run():
    assert list(epochs_to_run(0, 5)) == [0, 1, 2, 3, 4]
    assert list(epochs_to_run(2, 5, 2)) == [2, 3]
    assert list(epochs_to_run(4, 5, 3)) == [4]
    assert list(epochs_to_run(5, 5)) == []


def test_checkpoint_restores_exactly_and_is_atomic(tmp_path):
    torch.manual_seed(0)
    m = nn.Linear(4, 3); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.1)
    m(torch.randn(2, 4)).sum().backward(); opt.step(); sched.step()
    ckpt = Checkpoint(tmp_path, Cfg())
    ckpt.save(epoch=1, model=m.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), history=[1.5])
    assert ckpt.path == tmp_path / CHECKPOINT and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]
    m2 = nn.Linear(4, 3); opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, [1], 0.1)
    saved = Checkpoint(tmp_path, Cfg()).load(model=m2, optimizer=opt2, scheduler=sched2)
    assert list(saved) == ["config", "epoch", "model", "optimizer", "scheduler", "history"]
    assert saved["epoch"] == 1 and saved["history"] == [1.5] and saved["config"] == Cfg().to_dict()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], opt2.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.state_dict() == sched.state_dict() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_checkpoint_nothing_to_resume(tmp_path):
    Checkpoint(tmp_path, Cfg()).save(epoch=1)
    assert Checkpoint(tmp_path, Cfg()).load(resume=False) is None
    assert Checkpoint(tmp_path / "empty", Cfg()).load() is None


def test_checkpoint_refuses_another_config_or_an_unreadable_file(tmp_path):
    Checkpoint(tmp_path, Cfg()).save(epoch=1)
    with pytest.raises(ValueError, match="another configuration"):
        Checkpoint(tmp_path, Cfg(lr=0.2)).load()
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable") as e:
        load_checkpoint(path, Cfg())
    assert str(path) in str(e.value) and "delete it" in str(e.value)
    save_checkpoint(path, torch.zeros(2))
    with pytest.raises(ValueError, match="unreadable"):
        Checkpoint(tmp_path, Cfg()).load()


def test_save_checkpoint_leaves_no_temporary_file_on_failure(tmp_path):
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / CHECKPOINT, dict(bad=lambda: 0))          # a lambda cannot be pickled
    assert list(tmp_path.iterdir()) == []


def test_prepare_teacher():
    t = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    out = prepare_teacher(t, torch.device("cpu"), torch.float64)
    assert out is t and not t.training and not any(m.training for m in t.modules())
    assert all(not p.requires_grad and p.dtype == torch.float64 for p in t.parameters())
    u = prepare_teacher(nn.Linear(2, 2), torch.device("cpu"), freeze=False)
    assert not u.training and all(p.requires_grad and p.dtype == torch.float32 for p in u.parameters())


def test_check_finite_names_epoch_step_and_fix():
    check_finite(torch.tensor(1.0, requires_grad=True) * 2, 0, 0)
    check_finite(3.0, 0, 0)
    for bad in (float("nan"), float("inf"), torch.tensor(float("-inf"))):
        with pytest.raises(FloatingPointError, match=r"at epoch 4, step 7: lower the learning rate"):
            check_finite(bad, 3, 7)


def test_single_process_forms_and_cpu_precision():
    run = Processes(device="cpu")
    assert (run.device, run.main, run.world) == (torch.device("cpu"), True, 1)
    m = nn.Linear(2, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert run.wrap(m, opt) == (m, opt, m)
    x = torch.ones(3)
    assert run.sum(x) is x and run.shard([1, 2]) == [1, 2]
    run.barrier()
    loss = m(torch.ones(1, 2)).sum(); run.backward(loss)
    assert m.weight.grad is not None
    for amp in (True, False):
        with mixed_precision(torch.device("cpu"), amp), run.autocast(amp):
            assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_progress_bar_disabled_yields_everything():
    bar = progress_bar(range(5), "x", enabled=False)
    assert list(bar) == list(range(5)) and len(bar) == 5


def test_a_resumed_checkpoint_says_where_it_resumes(tmp_path, capsys):
    Checkpoint(tmp_path, Cfg()).save(epoch=2)
    Checkpoint(tmp_path, Cfg()).load()
    assert capsys.readouterr().out == f"resuming {tmp_path} from epoch 2\n"              # Cfg has no epochs field
    Checkpoint(tmp_path, Cfg()).load(report=False)
    Checkpoint(tmp_path / "fresh", Cfg()).load()                                        # nothing to resume: silent
    assert capsys.readouterr().out == ""
    assert [checkpoint_epoch(s) for s in (dict(epoch=3), dict(state=dict(epoch=4, history=[])), {}, dict(state=[]))] \
        == [3, 4, None, None]
    assert resume_line("r", dict(state=dict(epoch=4)), 10) == "resuming r from epoch 4 (4 of 10 epochs done)"
    assert resume_line("r", {}, 10) == "resuming r"


def test_a_real_resumed_run_prints_the_resume_line_once(tmp_path, capsys):
    "The CIFAR trainer stopped after 1 of 3 epochs, then resumed: one line, before the epochs it still trains."
    from abkd.cifar.train import TrainConfig, fit
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = dict(train=torch.utils.data.TensorDataset(x, y), test=torch.utils.data.TensorDataset(x[:12], y[:12]))
    cfg = TrainConfig("toy", epochs=3, batch_size=8, lr=0.1, milestones=(2,), num_classes=3)
    def model():
        torch.manual_seed(0)
        return nn.Linear(6, 3)
    fit(cfg, model(), data, tmp_path, stop_after=1, progress=False)
    assert "resuming" not in capsys.readouterr().out                                     # a fresh run says nothing
    done = fit(cfg, model(), data, tmp_path, progress=True)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("resuming", "epoch"))]
    assert done["finished"] and lines[0] == f"resuming {tmp_path} from epoch 1 (1 of 3 epochs done)"
    assert [l.split(":")[0] for l in lines[1:]] == ["epoch 2/3", "epoch 3/3"]


def test_data_not_found_and_its_hint():
    assert issubclass(DataNotFoundError, FileNotFoundError)
    with pytest.raises(DataNotFoundError) as e:
        with inputs_hint("root: $X, default ./data"):
            raise DataNotFoundError("Set: folder data/s not found; put it there")
    assert str(e.value) == "Set: folder data/s not found; put it there (root: $X, default ./data)"
    with pytest.raises(FileNotFoundError) as e:                      # only DataNotFoundError gets the hint
        with inputs_hint("root: $X"):
            raise FileNotFoundError("a bug")
    assert str(e.value) == "a bug"


def test_load_pretrained_names_the_model_where_it_looked_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    from transformers import AutoTokenizer
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)                  # nothing touches the network
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as e:
        load_pretrained(AutoTokenizer.from_pretrained, "abkd-nowhere/no-such-model", "tokenizer", "Fix: set $M")
    msg = str(e.value)
    assert msg.startswith("tokenizer 'abkd-nowhere/no-such-model' not found: no local folder of that name")
    assert "HF_HUB_OFFLINE=1" in msg and msg.endswith("Fix: set $M") and "\n" not in msg
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(DataNotFoundError, match="the local folder .*empty_model lacks its files"):
        load_pretrained(AutoTokenizer.from_pretrained, str(tmp_path / "empty_model"), "tokenizer", "")
    with pytest.raises(ValueError, match="invalid literal"):          # a bug in the loader is not a missing input
        load_pretrained(int, "not-a-number", "x", "")
    assert load_pretrained(len, "abc", "x", "") == 3


# --- progress that names its run, plain lines off a terminal, a log file without escapes ---

from abkd.training import progress_line

def test_run_name_prefixes_bars_and_lines_and_nests(capsys):
    from abkd.training import current_run, named, run_name
    with run_name("cifar100"):
        with run_name("kd seed 0"):
            assert named("epoch 1") == "cifar100 · kd seed 0: epoch 1"
            progress_line("epoch 1/6: loss 0.5")
        assert current_run() == "cifar100"
    assert current_run() == "" and named("x") == "x"
    assert "cifar100 · kd seed 0: epoch 1/6: loss 0.5" in capsys.readouterr().out


def test_off_a_terminal_the_bar_writes_plain_periodic_lines(capsys):
    from abkd.training import Progress
    bar = Progress(range(3), "kd seed 0: epoch 2", terminal=False, every=0.0)
    seen = []
    for x in bar: bar.set_postfix(loss="0.25"); seen.append(x)
    err = capsys.readouterr().err
    assert seen == [0, 1, 2] and len(bar) == 3
    assert err.splitlines() == [f"kd seed 0: epoch 2: {i}/3 steps, 0 s, loss 0.25" for i in (1, 2, 3)]
    assert "\r" not in err and "\x1b" not in err


def test_on_a_terminal_the_bar_is_tqdm(capsys):
    from abkd.training import Progress
    bar = Progress(range(2), "epoch 1", terminal=True)
    assert bar.bar is not None and list(bar) == [0, 1]
    assert Progress(range(2), "epoch 1", terminal=False).bar is None


def test_log_file_gets_plain_time_stamped_lines(tmp_path, capsys):
    import re
    from abkd.training import Progress, log_file, plain_text, run_name, named
    path = tmp_path / "a" / "abkd.log"
    with log_file(path), run_name("teacher"):
        progress_line("epoch 1/2 \x1b[1mdone\x1b[0m\r")
        for _ in Progress(range(2), named("epoch 2"), terminal=True, every=0.0): pass   # the bar: console only
    progress_line("after the block")                                                    # not logged
    lines = path.read_text().splitlines()
    assert lines[0].endswith("teacher: epoch 1/2 done") and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", lines[0])
    assert any(l.endswith("teacher: epoch 2: 2/2 steps, 0 s") for l in lines)
    assert not any("after the block" in l for l in lines)
    assert "\r" not in path.read_text() and "\x1b" not in path.read_text()
    assert plain_text("a\rb\x1b[2Kc\x08") == "a b c"
