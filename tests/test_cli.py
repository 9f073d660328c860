"""The `abkd` command: the main job writes records, tables generated from them and figures; bad arguments exit 2."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abkd.cli import EXPERIMENTS, main, write_named_points_table

ROOT = Path(__file__).resolve().parent.parent


def test_reproduce_theory_writes_record_table_and_figure(tmp_path):
    assert main(["reproduce", "--only", "theory", "--out", str(tmp_path)]) == 0
    out = tmp_path / "theory"
    assert sorted(p.name for p in out.iterdir()) == ["ab_plane.png", "named_points.json", "named_points.md"]
    rec = json.loads((out / "named_points.json").read_text())
    assert rec["experiment"] == "theory/named_points" and rec["seed"] == 0
    assert {"git", "versions", "hardware"} <= set(rec["provenance"])
    assert len(rec["metrics"]) >= 8 and all(m["rel_gap"] < 1e-12 for m in rec["metrics"].values())
    assert (out / "ab_plane.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "named_points.md").read_text()
    for name, m in rec["metrics"].items():
        assert name in table and f"{m['closed_form']:.12g}" in table


def test_table_is_generated_from_the_record(tmp_path):
    main(["reproduce", "--only", "theory", "--out", str(tmp_path)])
    rec_path = tmp_path / "theory" / "named_points.json"
    rec = json.loads(rec_path.read_text())
    rec["metrics"]["forward KL"]["closed_form"] = 123.456
    rec_path.write_text(json.dumps(rec))
    text = write_named_points_table(rec_path, tmp_path / "t.md").read_text()
    assert "123.456" in text


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
