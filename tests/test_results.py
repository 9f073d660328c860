"""Tests of abkd.results: records (write, read, validate), published tables, aggregation and rendering."""
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from abkd import results as R
from abkd.results import (SCALES, aggregate, by_scale, cite_published, environment_info, error_message,
                          format_mean_std, load_records, pair_label, published, published_number, published_tables,
                          records_to_table, render_table, save_record, write_markdown)


@dataclasses.dataclass
class Cfg:
    method: str = "ab"
    alpha: float = 0.8
    beta: float = 0.3
    out: Path = Path("runs/demo")


def _files(d):
    return sorted(p.relative_to(d).as_posix() for p in Path(d).rglob("*") if p.is_file())


# --- provenance -----------------------------------------------------------------------------------------------

def test_environment_info_outside_git(tmp_path, monkeypatch):
    info = environment_info(cwd=tmp_path)
    assert info["git"] is None
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["numpy"] == np.__version__
    assert info["versions"]["abkd"]
    assert info["hardware"]["cpu_count"] == os.cpu_count()
    assert "hostname" not in json.dumps(info) and "node" not in info["hardware"]
    assert info["timestamp_utc"].endswith("+00:00")


def test_environment_info_never_raises_without_git(monkeypatch):
    def no_git(*a, **k): raise FileNotFoundError("git")
    monkeypatch.setattr(R.subprocess, "run", no_git)
    assert environment_info()["git"] is None


def test_git_info_in_a_repository(tmp_path):
    import subprocess
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
        run("init", "-q"); (tmp_path / "f.txt").write_text("x")
        run("add", "f.txt"); run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not usable here")
    g = R.git_info(tmp_path)
    assert len(g["sha"]) == 40 and g["dirty"] is False
    (tmp_path / "f.txt").write_text("y")
    assert R.git_info(tmp_path)["dirty"] is True
    (tmp_path / "untracked.json").write_text("{}")  # untracked files do not count
    (tmp_path / "f.txt").write_text("x")
    assert R.git_info(tmp_path)["dirty"] is False


# --- writing and reading records ------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    path = tmp_path / "deep" / "dir" / "run.json"
    rec = save_record(path, experiment="cifar100", config=Cfg(), seed=np.int64(10), notes="smoke",
                      metrics={"top1": np.float32(74.5), "loss": torch.tensor(0.25), "per_epoch": [1.0, 2]})
    assert rec["schema_version"] == R.SCHEMA_VERSION
    assert rec["config"] == {"method": "ab", "alpha": 0.8, "beta": 0.3, "out": "runs/demo"}
    assert rec["seed"] == 10 and type(rec["seed"]) is int
    assert rec["metrics"] == {"top1": 74.5, "loss": 0.25, "per_epoch": [1.0, 2]}
    assert set(rec["provenance"]) == {"git", "versions", "hardware", "timestamp_utc"}
    assert load_records(path) == [rec]
    assert load_records(tmp_path) == [rec]
    assert _files(tmp_path) == ["deep/dir/run.json"]


def test_atomic_write_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    old = save_record(path, experiment="e", config={}, metrics={"acc": 1.0})
    before = path.read_text()

    def crash(fd): raise OSError("disk died")  # after the temp file was written, before the rename
    monkeypatch.setattr(R.os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        save_record(path, experiment="e", config={}, metrics={"acc": 2.0})
    assert path.read_text() == before and load_records(path) == [old]
    assert _files(tmp_path) == ["run.json"]  # no temporary file left


def test_environment_info_describes_the_code_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a repository; the default still looks where abkd lives
    assert environment_info()["git"] == R.git_info(Path(R.abkd.__file__).resolve().parent)


def test_save_figure_is_atomic(tmp_path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(); ax.plot([0, 1])
    out = R.save_figure(fig, tmp_path / "figs" / "a.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _files(tmp_path) == ["figs/a.png"]
    with pytest.raises(Exception):
        R.save_figure(fig, tmp_path / "figs" / "b.unknownformat")
    assert _files(tmp_path) == ["figs/a.png"]  # the failed save left nothing behind
    plt.close(fig)


def test_unserializable_metric_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match=r"metrics\.bad"):
        save_record(tmp_path / "out" / "run.json", experiment="e", config={}, metrics={"bad": object()})
    with pytest.raises(TypeError, match=r"config\.fn"):
        save_record(tmp_path / "run.json", experiment="e", config={"fn": print}, metrics={"a": 1.0})
    with pytest.raises(TypeError, match="not a number"):
        save_record(tmp_path / "run.json", experiment="e", config={}, metrics={"a": "high"})
    assert _files(tmp_path) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf, np.float32("nan"), torch.tensor(float("nan"))])
def test_non_finite_metric_names_the_key(tmp_path, bad):
    with pytest.raises(ValueError, match=r"metrics\.rougeL\.Dolly"):
        save_record(tmp_path / "r.json", experiment="e", config={}, metrics={"rougeL": {"Dolly": bad}})
    assert _files(tmp_path) == []


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(experiment=""), ValueError, "experiment"),
    (dict(experiment=3), ValueError, "experiment"),
    (dict(config=[1]), TypeError, "config must be a dict"),
    (dict(metrics=[1.0]), TypeError, "metrics must be a dict"),
    (dict(metrics={}), ValueError, "metrics is empty"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(notes=3), TypeError, "notes"),
])
def test_save_record_validation(tmp_path, kwargs, err, msg):
    args = dict(experiment="e", config={}, metrics={"a": 1.0}) | kwargs
    with pytest.raises(err, match=msg):
        save_record(tmp_path / "r.json", **args)
    with pytest.raises(ValueError, match=r"\.json"):
        save_record(tmp_path / "r.txt", experiment="e", config={}, metrics={"a": 1.0})
    assert _files(tmp_path) == []


def test_corrupt_file_error_names_the_path(tmp_path):
    save_record(tmp_path / "a.json", experiment="e", config={}, metrics={"a": 1.0})
    bad = tmp_path / "sub" / "b.json"
    bad.parent.mkdir()
    bad.write_text('{"experiment": "e", ')
    with pytest.raises(ValueError, match=r"b\.json: not valid JSON"):
        load_records(tmp_path)
    bad.write_text(json.dumps({"experiment": "e", "metrics": {}}))
    with pytest.raises(ValueError, match=r"b\.json: not a result record: missing keys \['schema_version', 'config'\]"):
        load_records(tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=str(bad).replace("\\", "\\\\")):
        load_records(bad)
    bad.write_text(json.dumps({"schema_version": 99, "experiment": "e", "config": {}, "metrics": {}}))
    with pytest.raises(ValueError, match="schema_version 99"):
        load_records(tmp_path)


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_records(missing)


def test_filtering_and_order(tmp_path):
    for name, exp in [("z.json", "llm"), ("b/y.json", "cifar100"), ("a.json", "cifar100")]:
        save_record(tmp_path / name, experiment=exp, config={"name": name}, metrics={"a": 1.0})
    assert [r["config"]["name"] for r in load_records(tmp_path)] == ["a.json", "b/y.json", "z.json"]
    assert [r["config"]["name"] for r in load_records(tmp_path, "cifar100")] == ["a.json", "b/y.json"]
    assert load_records(tmp_path, "clip") == []


# --- published tables ------------------------------------------------------------------------------------------

def test_published_lookup():
    ids = published_tables()
    assert {"gpt2_rougel", "gpt2_rougel_minillm", "gpt2_teacher_sft", "cifar100_teachers", "cifar100_students",
            "cifar100_kd_dkd", "cifar100_ls", "cifar100_ttm", "cifar100_abkd_paper", "clip_promptkd",
            "clip_abkd_paper"} <= set(ids)
    g = published("gpt2_rougel")
    assert g["id"] == "gpt2_rougel" and len(g["rows"]) == 7
    assert g["rows"]["SFT"] == {"Dolly": 23.14, "SelfInst": 10.22, "Vicuna": 15.15, "S-NI": 17.41, "UnNI": 19.76}
    assert g["rows"]["ABKD"]["UnNI"] == 29.32
    assert published("gpt2_rougel_minillm")["rows"]["MiniLLM"]["S-NI"] == 25.3
    assert published("gpt2_teacher_sft")["rows"]["GPT-2 XL (SFT)"] == {"Dolly": 27.04}
    assert "jongwooko/distillm issue #5" in published("gpt2_teacher_sft")["source"]
    assert published("cifar100_kd_dkd")["rows"][pair_label("ResNet50", "MobileNetV2")] == {"KD": 67.35, "DKD": 70.35}
    assert len(published("cifar100_kd_dkd")["rows"]) == 11
    assert "megvii-research/mdistiller" in published("cifar100_kd_dkd")["source"]
    assert published("cifar100_ls")["rows"][pair_label("resnet56", "resnet20")] == {"KD+LS": 71.43, "DKD+LS": 72.32}
    assert published("cifar100_ttm")["rows"][pair_label("resnet32x4", "resnet8x4")] == {"TTM": 76.17, "WTTM": 76.06}
    assert published("cifar100_teachers")["rows"]["resnet32x4"] == {"top1": 79.42}
    assert published("cifar100_students")["rows"]["MobileNetV2"] == {"top1": 64.60}
    assert published("clip_promptkd")["rows"]["DTD"] == {"base": 85.84, "new": 71.37}
    for tid in ("cifar100_abkd_paper", "clip_abkd_paper"):
        t = published(tid)
        assert t["rows"] == {} and t["missing"] == "paper value not recorded"
    for tid in ids:
        t = published(tid)
        assert t["source"] and t["title"] and t["metric"] and isinstance(t["decimals"], int)
        assert all(set(c) <= set(t["columns"]) for c in t["rows"].values())


def test_published_file_is_packaged():
    data = json.loads((Path(R.__file__).parent / "data" / "published.json").read_text(encoding="utf-8"))
    assert data["schema_version"] == 1 and list(data["tables"]) == published_tables()


def test_published_returns_copies():
    published("gpt2_rougel")["rows"].clear()
    assert len(published("gpt2_rougel")["rows"]) == 7


def test_published_unknown_id():
    with pytest.raises(ValueError, match=r"unknown published table 'cifar10'.*valid ids: .*gpt2_rougel"):
        published("cifar10")


# --- aggregation and rendering --------------------------------------------------------------------------------

def test_aggregate_numbers():
    a = aggregate([70.0, 71.0, 72.5])
    assert a["n"] == 3 and a["mean"] == pytest.approx(71.16666666666667)
    assert a["std"] == pytest.approx(np.std([70.0, 71.0, 72.5], ddof=1))
    assert aggregate([3.0]) == {"mean": 3.0, "std": None, "n": 1}
    assert aggregate(3) == {"mean": 3.0, "std": None, "n": 1}
    assert aggregate(np.float32(2.0)) == {"mean": 2.0, "std": None, "n": 1}
    assert aggregate(torch.tensor([1.0, 3.0]))["mean"] == 2.0
    assert aggregate(np.array([1, 3]))["std"] == pytest.approx(2 ** 0.5)
    assert format_mean_std([25.1, 25.3, 25.5]) == "25.30 ± 0.20 (n=3)"
    assert format_mean_std([74.04], decimals=1) == "74.0 (n=1)"
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError):
        aggregate([1.0, float("nan")])


def _gpt2_records(tmp_path):
    for method, seed, dolly, unni in [("ABKD", 10, 25.0, 29.0), ("ABKD", 20, 26.0, 30.0), ("KD", 10, 23.0, 19.0)]:
        save_record(tmp_path / f"{method}-{seed}.json", experiment="gpt2", seed=seed, config={"method": method},
                    metrics={"rougeL": {"Dolly": dolly, "UnNI": unni}})
    return load_records(tmp_path, "gpt2")


def test_records_to_table(tmp_path):
    recs = _gpt2_records(tmp_path)
    assert records_to_table(recs, "config.method", metric="rougeL") == {
        "ABKD": {"Dolly": [25.0, 26.0], "UnNI": [29.0, 30.0]}, "KD": {"Dolly": [23.0], "UnNI": [19.0]}}
    by_seed = records_to_table(recs, lambda r: r["config"]["method"].lower(), "seed", "rougeL.UnNI")
    assert by_seed == {"abkd": {"10": [29.0], "20": [30.0]}, "kd": {"10": [19.0]}}
    with pytest.raises(KeyError, match="rougeL.SNI"):
        records_to_table(recs, "config.method", "seed", "rougeL.SNI")
    with pytest.raises(TypeError, match="col_key=None"):
        records_to_table(recs, "config.method", metric="rougeL.Dolly")


def test_render_table_ours_beside_published(tmp_path):
    ours = records_to_table(_gpt2_records(tmp_path), "config.method", metric="rougeL")
    md = render_table(["ABKD", "KD", "GKD"], ["Dolly", "UnNI"], ours, "gpt2_rougel")
    lines = md.splitlines()
    assert lines[0] == "|  | Dolly ours | Dolly published | UnNI ours | UnNI published |"
    assert "| ABKD | 25.50 ± 0.71 (n=2) | 25.65 [1] | 29.50 ± 0.71 (n=2) | 29.32 [1] |" in lines
    assert "| KD | 23.00 (n=1) | 23.80 [1] | 19.00 (n=1) | 18.99 [1] |" in lines
    assert "| GKD | not run | 24.49 [1] | not run | 21.41 [1] |" in lines
    assert "Sources:" in lines
    src = published("gpt2_rougel")["source"]
    assert any(l.startswith("- [1] ") and "`gpt2_rougel`" in l and src in l for l in lines)


def test_render_table_several_sources_and_missing_labels():
    pair = pair_label("resnet32x4", "resnet8x4")
    md = render_table([pair, "a → b"], ["KD", "WTTM", "ABKD", "CRD"],
                      {pair: {"ABKD": [76.0, 76.4]}},
                      ["cifar100_kd_dkd", "cifar100_ttm", "cifar100_abkd_paper"], row_header="pair")
    lines = md.splitlines()
    assert (f"| {pair} | not run | 73.33 [1] | not run | 76.06 [2] | 76.20 ± 0.28 (n=2) | "
            f"paper value not recorded [3] | not run | not recorded |") in lines
    assert ("| a → b | not run | not recorded [1] | not run | not recorded [2] | not run | "
            "paper value not recorded [3] | not run | not recorded |") in lines
    for i, tid in enumerate(["cifar100_kd_dkd", "cifar100_ttm", "cifar100_abkd_paper"], 1):
        assert any(l.startswith(f"- [{i}] ") and f"`{tid}`" in l for l in lines)


def test_render_table_defaults_and_decimals():
    md = render_table(reference="gpt2_rougel_minillm")  # rows and columns from the table
    lines = md.splitlines()
    assert lines[0].startswith("|  | Dolly ours | Dolly published | SelfInst ours")
    assert lines[2].startswith("| SFT | not run | 23.3 [1] | not run | 10.0 [1] |")  # source printed one decimal
    spread = render_table(reference="cifar100_dkd_spread").splitlines()
    assert "| 5 [1] |" in spread[2] and "75.80 [1]" in spread[2]  # integers stay integers
    only_ours = render_table(["x"], ["acc"], {"x": {"acc": 1.0}}).splitlines()
    assert only_ours[0] == "|  | acc ours |" and "Sources:" not in only_ours


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        save_record(tmp_path / "r.json", experiment="e", config={}, metrics={"a": 1.0})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_format_mean_std_without_the_count():
    assert format_mean_std([25.1, 25.3, 25.5], count=False) == "25.30 ± 0.20"
    assert format_mean_std([74.04], count=False) == "74.04"


def test_published_number_and_citations():
    assert published_number(published("gpt2_rougel"), "ABKD", "Dolly") == "25.65"
    assert published_number(published("gpt2_rougel_minillm"), "SFT", "Dolly") == "23.3"    # the source's decimals
    assert published_number(published("gpt2_rougel"), "ABKD", "no such column") is None
    assert published_number(published("gpt2_rougel"), "no such row", "Dolly") is None
    line = cite_published(["clip_promptkd", "gpt2_rougel"])
    assert line == f"[clip_promptkd] {published('clip_promptkd')['source']} [gpt2_rougel] {published('gpt2_rougel')['source']}"


def test_write_markdown_joins_title_and_blocks(tmp_path):
    path = write_markdown(tmp_path / "a" / "t.md", "Title", "A note.", "", "| a |\n|---|")
    assert path == tmp_path / "a" / "t.md"
    assert path.read_text() == "# Title\n\nA note.\n\n| a |\n|---|\n"
    assert _files(tmp_path) == ["a/t.md"]                                     # no temporary file left


def test_by_scale_is_the_one_switch():
    assert SCALES == ("smoke", "paper")
    assert by_scale("smoke", smoke=1, paper=2) == 1 and by_scale("paper", smoke=1, paper=2) == 2
    with pytest.raises(ValueError, match="scale must be 'smoke' or 'paper', got 'huge'"):
        by_scale("huge", smoke=1, paper=2)
    with pytest.raises(TypeError, match="one choice per scale"):
        by_scale("smoke", smoke=1)


def test_error_message_is_one_stable_line(tmp_path):
    digest = "ab" * 32
    def boom(): raise ValueError(f"{tmp_path}/x.pt has sha256 {digest},\n  expected another")
    assert error_message(boom, hide=tmp_path) == "ValueError: <tmp>/x.pt has sha256 <sha256>, expected another"
    assert error_message(boom, width=20) == "ValueError: " + str(tmp_path)[:7] + "…"
    with pytest.raises(AssertionError, match="raised no exception"):
        error_message(lambda: None)
