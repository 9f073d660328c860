"""The `abkd` command: it dispatches to experiment modules that follow one protocol; bad arguments exit 2."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abkd.cli import EXPERIMENTS, Experiment, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "--only", "theroy"], "choose from theory"),
    (["reproduce", "--scale", "huge"], "invalid choice"),
    (["reproduce", "--only", ""], "unknown experiment"),
    ([], "required"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv + (["--out", str(tmp_path / "x")] if argv else []))
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_every_experiment_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in EXPERIMENTS)


def test_console_script_is_installed():
    exe = shutil.which("abkd") or str(Path(sys.executable).parent / "abkd")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("abkd ")


def test_readme_is_generated_from_index_notebook():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_module_follows_the_protocol(name, tmp_path):
    module = EXPERIMENTS[name].load()
    assert all(hasattr(module, a) for a in ("SMOKE", "PAPER", "reproduce")), name
    with pytest.raises(ValueError, match="scale must be 'smoke' or 'paper'.*got 'huge'"):
        module.reproduce(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()


def test_reproduce_dispatches_to_the_module(monkeypatch, tmp_path, capsys):
    import types
    calls = []
    standin = types.ModuleType("abkd_standin")
    standin.SMOKE, standin.PAPER = {}, {}
    standin.reproduce = lambda out_dir, scale: calls.append((out_dir, scale)) or [out_dir / "standin" / "t.md"]
    monkeypatch.setitem(EXPERIMENTS, "standin", Experiment("standin", lambda: standin, "a stand-in"))
    assert main(["reproduce", "--only", "standin", "--scale", "paper", "--out", str(tmp_path)]) == 0
    assert calls == [(tmp_path, "paper")]
    assert str(tmp_path / "standin" / "t.md") in capsys.readouterr().out


# --- runs that cannot go on: one line on stderr, exit 2 (refused) or 130 (Ctrl-C); bugs keep their traceback ---

import errno
import os
import re
import tempfile
import types
from dataclasses import asdict, dataclass

from abkd.cli import OutputDirError, check_output_dir
from abkd.training import CHECKPOINT, Checkpoint, DataNotFoundError, epochs_to_run

MESSAGE = re.compile(r"abkd( reproduce)?: (error|interrupted)")


def message_lines(err: str) -> list[str]:
    "The message lines of stderr (the progress bar shares it)."
    return [line for line in err.splitlines() if MESSAGE.match(line)]


def one_message(err: str) -> str:
    lines = message_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@dataclass
class RunConfig:
    epochs: int = 3
    def to_dict(self): return asdict(self)


def standin(monkeypatch, reproduce) -> list:
    "Register a stand-in experiment whose reproduce is `reproduce(out_dir, scale)`; returns the list of its calls."
    calls = []
    m = types.ModuleType("abkd_standin")
    m.SMOKE, m.PAPER = {}, {}
    m.reproduce = lambda out_dir, scale: calls.append((out_dir, scale)) or reproduce(out_dir, scale)
    monkeypatch.setitem(EXPERIMENTS, "standin", Experiment("standin", lambda: m, "a stand-in"))
    return calls


def checkpointed_run(interrupt_after=None):
    "One run of 3 epochs checkpointed each epoch through Checkpoint, as the trainers do; Ctrl-C after an epoch."
    def reproduce(out_dir, scale):
        ckpt = Checkpoint(out_dir / "standin" / "run", RunConfig())
        saved = ckpt.load()
        for epoch in epochs_to_run(saved["epoch"] if saved else 0, 3):
            ckpt.save(epoch=epoch + 1)
            if epoch + 1 == interrupt_after: raise KeyboardInterrupt
        return [ckpt.path]
    return reproduce


@pytest.mark.parametrize("where", ["afile", "afile/theory"])
def test_out_that_is_or_lies_under_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "afile").write_text("not a folder")
    calls = standin(monkeypatch, lambda out_dir, scale: [])
    out = tmp_path / where
    assert main(["reproduce", "--only", "standin", "--out", str(out)]) == 2
    assert calls == []
    line = one_message(capsys.readouterr().err)
    assert line == f"abkd: error: --out {out}: cannot write there ({tmp_path / 'afile'} is a file, not a folder)"


def test_check_output_dir_creates_the_folder_and_leaves_no_probe(tmp_path):
    check_output_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match=r"is a file, not a folder") as e:
        check_output_dir(tmp_path / "f" / "deeper" / "still")
    assert isinstance(e.value, OSError) and str(tmp_path / "f") in str(e.value)


def test_a_failing_probe_is_refused_with_the_system_reason(tmp_path, monkeypatch):
    def read_only(*a, **k): raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputDirError) as e:
        check_output_dir(tmp_path / "ro")
    assert str(e.value) == f"--out {tmp_path / 'ro'}: cannot write there ({os.strerror(errno.EROFS)})"


def test_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:                          # root writes through a 0o500 mode: the probe is made to fail instead
        def denied(*a, **k): raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        monkeypatch.setattr(tempfile, "mkstemp", denied)
    calls = standin(monkeypatch, lambda out_dir, scale: [])
    try:
        for out in (ro, ro / "sub"):
            assert main(["reproduce", "--only", "standin", "--out", str(out)]) == 2
            line = one_message(capsys.readouterr().err)
            assert line.startswith(f"abkd: error: --out {out}: cannot write there (") and "ermission denied" in line
    finally: ro.chmod(0o700)
    assert calls == []


def test_ctrl_c_names_the_last_checkpoint_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    argv = ["reproduce", "--only", "standin", "--out", str(tmp_path)]
    standin(monkeypatch, checkpointed_run(interrupt_after=1))
    assert main(argv) == 130
    ckpt = tmp_path / "standin" / "run" / CHECKPOINT
    assert one_message(capsys.readouterr().err) == (
        f"abkd: interrupted during standin; kept: finished runs and the last checkpoint {ckpt}; to resume, run the "
        f"same command: abkd reproduce --only standin --out {tmp_path}")
    standin(monkeypatch, checkpointed_run())
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"standin: resuming {ckpt.parent} from epoch 1 (1 of 3 epochs done)" in captured.out.splitlines()
    assert message_lines(captured.err) == []


def test_ctrl_c_before_any_checkpoint(tmp_path, monkeypatch, capsys):
    theory = EXPERIMENTS["theory"].load()
    def interrupted(out_dir, scale): raise KeyboardInterrupt
    monkeypatch.setattr(theory, "reproduce", interrupted)
    assert main(["reproduce", "--only", "theory", "--out", str(tmp_path)]) == 130
    assert one_message(capsys.readouterr().err) == (
        f"abkd: interrupted during theory; no checkpoint yet (files written so far are in {tmp_path / 'theory'}); "
        f"to start it again, run the same command: abkd reproduce --only theory --out {tmp_path}")


def test_a_missing_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    def missing(out_dir, scale): raise DataNotFoundError("Some set: folder /nowhere not found;\nput it there")
    standin(monkeypatch, missing)
    assert main(["reproduce", "--only", "standin", "--scale", "paper", "--out", str(tmp_path)]) == 2
    assert one_message(capsys.readouterr().err) == \
        "abkd: error: standin --scale paper: Some set: folder /nowhere not found; put it there"
    for bug in (ZeroDivisionError, FileNotFoundError, KeyError):
        def broken(out_dir, scale): raise bug("a bug")
        standin(monkeypatch, broken)
        with pytest.raises(bug):
            main(["reproduce", "--only", "standin", "--out", str(tmp_path)])


@pytest.fixture
def no_paper_inputs(tmp_path, monkeypatch):
    "Every paper-scale input pointed at an empty folder, the hub switched off (environment and loaded constants)."
    import datasets
    import huggingface_hub.constants as hub
    empty = tmp_path / "empty"
    for k, v in dict(ABKD_CLIP_DATA=empty / "clip", ABKD_CLIP_TEACHERS=empty / "clip_teachers",
                     ABKD_LLM_DATA=empty / "llm", HF_HOME=tmp_path / "hf", HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1,
                     TRANSFORMERS_OFFLINE=1).items():
        monkeypatch.setenv(k, str(v))
    for k in ("ABKD_LLM_TEACHER", "ABKD_LLM_STUDENT"): monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return empty


@pytest.mark.parametrize("name, names", [
    ("cifar100", ["teacher checkpoint", "cifar_teachers.tar", "cifar100/teachers"]),
    ("clip", ["ImageNet", "not found", "clip/imagenet", "$ABKD_CLIP_DATA", "DATASETS.md"]),
    ("llm", ["'gpt2-xl' not found", "HF_HUB_OFFLINE=1", "ABKD_LLM_TEACHER"]),
])
def test_paper_scale_without_its_inputs_is_one_line(no_paper_inputs, tmp_path, capsys, name, names):
    assert main(["reproduce", "--only", name, "--scale", "paper", "--out", str(tmp_path / "out")]) == 2
    line = one_message(capsys.readouterr().err)
    assert line.startswith(f"abkd: error: {name} --scale paper: ")
    assert all(n in line for n in names), line


def test_console_script_help_lists_experiments_and_a_bad_out_exits_2(tmp_path):
    exe = shutil.which("abkd") or str(Path(sys.executable).parent / "abkd")
    for argv in (["--help"], ["reproduce", "--help"]):
        r = subprocess.run([exe, *argv], capture_output=True, text=True)
        assert r.returncode == 0 and all(f"  {name} " in r.stdout for name in EXPERIMENTS), r.stdout
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([exe, "reproduce", "--only", "theory", "--out", str(tmp_path / "afile")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"abkd: error: --out {tmp_path / 'afile'}: cannot write there ({tmp_path / 'afile'} is a file, not a folder)"]


# --- abkd distill images (its data checks, runs and resume: tests/test_images.py) ---

def test_distill_images_is_listed_and_its_help_lists_architectures_and_methods(capsys):
    from abkd.cifar.models import MODEL_NAMES
    from abkd.cifar.recipes import ALL_METHODS
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "distill" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["distill", "images", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert all(name in text for name in MODEL_NAMES) and all(m in text for m in ALL_METHODS)
    for option in ("--data", "--teacher", "--student", "--methods", "--epochs", "--teacher-epochs", "--seeds", "--out",
                   "--alpha", "--beta", "--ab-grid", "--batch-size", "--lr", "--image-size", "--teacher-checkpoint"):
        assert option in text, option


@pytest.mark.parametrize("argv, message", [
    (["distill"], "required"),
    (["distill", "videos"], "invalid choice"),
    (["distill", "images", "--teacher", "resnet8", "--student", "resnet8"], "--data"),
])
def test_distill_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "x")] if argv[-1] != "distill" else argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_interrupted_message_names_the_given_folder(tmp_path):
    from abkd.cli import interrupted_message
    Checkpoint(tmp_path / "run" / "a", RunConfig()).save(epoch=1)
    line = interrupted_message("distill images", tmp_path / "run", ["distill", "images"], folder=tmp_path / "run")
    assert str(tmp_path / "run" / "a" / CHECKPOINT) in line and line.endswith("abkd distill images")


# --- what the main job hands over: index.md, abkd.log, ETA, paper-scale locations ---

def _standin_module(paths):
    import types
    m = types.ModuleType("abkd_standin")
    m.SMOKE, m.PAPER = {}, {}
    def reproduce(out_dir, scale, **kw):
        from abkd.training import progress_line, Progress, named
        for _ in Progress(range(3), named("epoch 1"), terminal=False, every=0.0): pass
        progress_line("epoch 1/1 done")
        for p in paths(out_dir): p.parent.mkdir(parents=True, exist_ok=True); p.write_text("x")
        return paths(out_dir)
    m.reproduce = reproduce
    return m


def test_index_links_every_table_and_figure_and_the_log_is_plain(monkeypatch, tmp_path, capsys):
    from abkd.cli import INDEX, LOG
    files = lambda out: [out / "standin" / "table.md", out / "standin" / "accuracy.png", out / "standin" / "r.json"]
    monkeypatch.setitem(EXPERIMENTS, "standin", Experiment("standin", lambda: _standin_module(files),
                                                           "a stand-in (smoke: tiny data; paper: big data)"))
    assert main(["reproduce", "--only", "standin", "--out", str(tmp_path)]) == 0
    index = (tmp_path / INDEX).read_text()
    assert "[standin/table.md](standin/table.md)" in index and "[standin/accuracy.png](standin/accuracy.png)" in index
    assert "**standin** — finished (smoke, " in index and "smoke: tiny data" in index and "big data" not in index
    log = (tmp_path / LOG).read_text()
    assert "standin: epoch 1: 1/3 steps" in log and "standin: epoch 1/1 done" in log, log
    assert "\r" not in log and "\x1b" not in log


def test_an_interrupted_run_keeps_an_index_of_what_finished(monkeypatch, tmp_path, capsys):
    from abkd.cli import INDEX
    files = lambda out: [out / "done" / "table.md"]
    def interrupted(out_dir, scale): raise KeyboardInterrupt
    import types
    broken = types.ModuleType("broken"); broken.SMOKE = broken.PAPER = {}; broken.reproduce = interrupted
    monkeypatch.setitem(EXPERIMENTS, "done", Experiment("done", lambda: _standin_module(files), "first"))
    monkeypatch.setitem(EXPERIMENTS, "broken", Experiment("broken", lambda: broken, "second"))
    assert main(["reproduce", "--only", "done,broken", "--out", str(tmp_path)]) == 130
    index = (tmp_path / INDEX).read_text()
    assert "**done** — finished" in index and "[done/table.md](done/table.md)" in index
    assert "**broken** — interrupted" in index and "1 of 2 experiments finished" in index


def test_eta_scales_the_table_by_the_speed_of_what_finished():
    from abkd.cli import SMOKE_SECONDS, eta_seconds, expected_seconds
    assert eta_seconds(["clip", "llm"], {}) == SMOKE_SECONDS["clip"] + SMOKE_SECONDS["llm"]
    slow = {"theory": 3 * SMOKE_SECONDS["theory"]}
    assert eta_seconds(["clip"], slow) == pytest.approx(3 * SMOKE_SECONDS["clip"])
    # not the first experiment's time times the number left
    assert eta_seconds(["clip"], slow) != pytest.approx(slow["theory"])
    assert expected_seconds("real-vocab") > 0


def test_data_and_teachers_options_override_env_and_defaults_lie_under_out(monkeypatch, tmp_path):
    from abkd.cli import paper_inputs
    out = tmp_path / "out"
    env = {"ABKD_CLIP_DATA": "rel/clipdata"}
    monkeypatch.chdir(tmp_path)
    kw = paper_inputs("clip", {"data": {}, "teachers": {}}, out, env)
    assert kw == {"data_root": str(tmp_path / "rel/clipdata"), "teachers_dir": str(out / "clip" / "teacher_model")}
    kw = paper_inputs("clip", {"data": {"clip": "/d/coop"}, "teachers": {}}, out, env)
    assert kw["data_root"] == "/d/coop"
    assert paper_inputs("llm", {"data": {}, "teachers": {"llm": "gpt2-xl"}}, out, {})["teacher_id"] == "gpt2-xl"
    assert paper_inputs("theory", {}, out, {}) == {}


def test_reproduce_help_lists_the_locations_and_their_variables(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    for s in ("--data", "--teachers", "ABKD_CLIP_DATA", "ABKD_CLIP_TEACHERS", "ABKD_LLM_DATA", "ABKD_LLM_TEACHER",
              "ABKD_LLM_STUDENT", "ABKD_CIFAR_DATA", "OUT/clip/teacher_model"):
        assert s in text, s


def test_data_option_at_smoke_scale_is_refused(tmp_path, capsys):
    assert main(["reproduce", "--only", "clip", "--data", "clip=/x", "--out", str(tmp_path)]) == 2
    assert "--scale paper" in capsys.readouterr().err
