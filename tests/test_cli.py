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
    with pytest.raises(ValueError, match="scale must be 'smoke' or 'paper', got 'huge'"):
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
