"""Tests of abkd.results: records (write, read, validate), published tables (the ABKD paper's checked against the
transcription in paper_tables.md), aggregation and rendering."""
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from abkd import results as R
from abkd.results import (SCALES, aggregate, by_scale, cite_published, environment_info, error_message,
                          format_mean_std, load_published, load_records, pair_label, paper_hyperparameter_tables,
                          paper_hyperparameters, paper_markdown, paper_number, paper_parts, paper_settings,
                          paper_source, paper_std, paper_table, paper_tables, published, published_number,
                          published_tables, records_to_table, render_table, save_record, training_fact,
                          training_facts, write_markdown)


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
    assert info["hardware"]["torch_threads"] == torch.get_num_threads()
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
    assert {"gpt2_rougel_minillm", "gpt2_teacher_sft", "cifar100_teachers", "cifar100_students",
            "cifar100_kd_dkd", "cifar100_ls", "cifar100_ttm"} <= set(ids)
    g = published("abkd_table2")
    assert g["id"] == "abkd_table2" and list(g["rows"]) == ["Teacher"] and len(g["parts"]["GPT-2 (0.1B)"]["rows"]) == 7
    assert g["parts"]["GPT-2 (0.1B)"]["rows"]["SFT"] == {"Dolly": 23.14, "SelfInst": 10.22, "Vicuna": 15.15,
                                                          "S-NI": 17.41, "UnNI": 19.76}
    assert g["parts"]["GPT-2 (0.1B)"]["rows"]["ABKD"]["UnNI"] == 29.32
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
    for tid in ids:
        t = published(tid)
        assert t["source"] and t["title"] and t["metric"] and isinstance(t["decimals"], int)
        assert all(set(c) <= set(t["columns"]) for c in t["rows"].values())
        assert t["rows"] or any(p["rows"] for p in t.get("parts", {}).values()), f"{tid} is an empty placeholder"


def test_published_file_is_packaged():
    data = json.loads((Path(R.__file__).parent / "data" / "published.json").read_text(encoding="utf-8"))
    assert data["schema_version"] == 1 and list(data["tables"]) == published_tables()


def test_published_returns_copies():
    published("cifar100_kd_dkd")["rows"].clear()
    assert len(published("cifar100_kd_dkd")["rows"]) == 11


def test_published_unknown_id():
    with pytest.raises(ValueError, match=r"unknown published table 'cifar10'.*valid ids: .*cifar100_kd_dkd.*abkd_table2"):
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
    table2 = paper_table(2, "GPT-2 (0.1B)")
    md = render_table(["ABKD", "KD", "GKD"], ["Dolly", "UnNI"], ours, table2)
    lines = md.splitlines()
    assert lines[0] == "|  | Dolly ours | Dolly published | UnNI ours | UnNI published |"
    assert "| ABKD | 25.50 ± 0.71 (n=2) | 25.65 [1] | 29.50 ± 0.71 (n=2) | 29.32 [1] |" in lines
    assert "| KD | 23.00 (n=1) | 23.80 [1] | 19.00 (n=1) | 18.99 [1] |" in lines
    assert "| GKD | not run | 24.49 [1] | not run | 21.41 [1] |" in lines
    assert "Sources:" in lines
    assert f"- [1] {table2['title']} (`abkd_table2`): ABKD paper (ICML 2025), Table 2" in lines


def test_render_table_several_sources_and_missing_labels():
    pair = pair_label("resnet32x4", "resnet8x4")
    # a table of our own that declares a `missing` label: its empty cells say why, cited like a value
    pending = {"id": "pending", "title": "Pending transcription", "source": "a test table", "columns": ["CRD", "KD"],
               "missing": "not transcribed", "rows": {pair: {"KD": 1.0}}, "decimals": 1}
    refs = ["cifar100_kd_dkd", "cifar100_ttm", paper_table("Fig. 5"), pending]
    md = render_table([pair, "a → b"], ["KD", "WTTM", "ABKD", "CRD", "FitNet"],
                      {pair: {"ABKD": [76.0, 76.4]}}, refs, row_header="pair")
    lines = md.splitlines()
    assert lines[0] == ("| pair | KD ours | KD published | WTTM ours | WTTM published | ABKD ours | ABKD published | "
                        "CRD ours | CRD published | FitNet ours | FitNet published |")
    assert (f"| {pair} | not run | 73.33 [1] | not run | 76.06 [2] | 76.20 ± 0.28 (n=2) | "
            f"Fig. 5 only [3] | not run | not transcribed [4] | not run | not recorded |") in lines
    # no table holds the row: the first table declaring the column is cited, with its label or 'not recorded'
    assert ("| a → b | not run | not recorded [1] | not run | not recorded [2] | not run | "
            "not recorded [3] | not run | not transcribed [4] | not run | not recorded |") in lines
    for i, tid in enumerate(["cifar100_kd_dkd", "cifar100_ttm", "abkd_fig5", "pending"], 1):
        assert any(l.startswith(f"- [{i}] ") and f"`{tid}`" in l for l in lines)
    assert "- [3] " + paper_table("Fig. 5")["title"] + " (`abkd_fig5`): ABKD paper (ICML 2025), Fig. 5" in lines


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
    table2 = paper_table(2, "GPT-2 (0.1B)")
    assert published_number(table2, "ABKD", "Dolly") == "25.65"
    assert published_number(table2, "ABKD", "Dolly", with_std=True) == "25.65 (0.24)"
    assert published_number(published("gpt2_rougel_minillm"), "SFT", "Dolly") == "23.3"    # the source's decimals
    assert published_number(table2, "ABKD", "no such column") is None
    assert published_number(table2, "no such row", "Dolly") is None
    line = cite_published(["cifar100_ttm", "abkd_table13"])
    assert line == f"[cifar100_ttm] {published('cifar100_ttm')['source']} [abkd_table13] ABKD paper (ICML 2025), Table 13"


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


# --- the ABKD paper's own tables --------------------------------------------------------------------------------
# The JSON was transcribed from the proceedings text; paper_tables.md is a second, independent transcription of the
# same tables (the reference of record). Parsing it here and comparing every number checks one against the other.

PAPER_TABLES_MD = [Path(__file__).resolve().parent / "data" / "paper_tables.md"]   # the reference's copy
NUM = r"-?\d*\.\d+"
CELL = re.compile(rf"({NUM})(?:\s*\(\+?({NUM})\))?")


@pytest.fixture(scope="module")
def md():
    "paper_tables.md as {section heading: [lines]}."
    found = [p for p in PAPER_TABLES_MD if p.exists()]
    assert found, f"paper_tables.md (the transcription of record) not found; looked in {[str(p) for p in PAPER_TABLES_MD]}"
    sections, cur = {}, None
    for line in found[0].read_text(encoding="utf-8").splitlines():
        if line.startswith("## "): cur = line[3:]; sections[cur] = []
        elif cur and line.strip(): sections[cur].append(line)
    return sections


def _section(md, prefix):
    hits = [k for k in md if k.startswith(prefix + " ") or k == prefix]
    assert len(hits) == 1, (prefix, list(md))
    return hits[0], md[hits[0]]


def _row(text):
    "'LABEL  1.0(0.1) 2.0(0.2) ...' -> (label, [(mean, std or None), ...]) as strings."
    m = re.match(rf"\s*(.*?)\s+(?={NUM})", text)
    return m.group(1).strip(), CELL.findall(text[m.end():])


class Compared:
    "Collects every (table, part, row, column) compared, to check afterwards that the JSON holds nothing else."
    def __init__(self): self.cells = set()

    def check(self, label, part, row, cols, cells, std=True):
        t = paper_table(label, part)
        assert len(cells) == len(cols), (label, part, row, cells)
        for col, (mean, sd) in zip(cols, cells):
            assert paper_number(label, row, col, part) == float(mean), (label, part, row, col)
            assert published_number(t, row, col) == mean, (label, part, row, col)          # the paper's decimals
            if std: assert published_number(t, row, col, with_std=True) == (f"{mean} ({sd})" if sd else mean)
            self.cells.add((label, part, row, col))

    def assert_complete(self, label, skip_parts=()):
        "Every cell of the JSON table (all blocks) was compared."
        parts = paper_parts(label) or [None]
        held = {(label, p, r, c) for p in parts if p not in skip_parts
                for r, cells in paper_table(label, p)["rows"].items() for c in cells}
        assert held == {x for x in self.cells if x[0] == label and x[1] not in skip_parts}, sorted(held ^ self.cells)[:5]


LLM = ["Dolly", "SelfInst", "Vicuna", "S-NI", "UnNI"]
MODEL = {"W40-2": "wrn_40_2", "W16-2": "wrn_16_2", "W40-1": "wrn_40_1", "r32x4": "resnet32x4", "r8x4": "resnet8x4",
         "vgg13": "vgg13", "vgg8": "vgg8"}
DATASET = {"Avg11": "Average (11 datasets)", "Caltech": "Caltech101", "Pets": "OxfordPets", "Cars": "StanfordCars",
           "Flowers": "Flowers102", "Food": "Food101", "Aircraft": "FGVCAircraft", "UCF": "UCF101", "SUN": "SUN397"}


def _model(abbrev):
    return MODEL.get(abbrev) or re.sub(r"^r(\d+)$", r"resnet\1", abbrev)


def test_every_paper_table_is_held_with_its_source_label():
    assert paper_tables() == ["2", "3/10", "8", "9", "11", "12", "13", "14", "15", "16", "Fig. 5"]
    assert paper_hyperparameter_tables() == ["4", "6", "7", "13"]
    for label in paper_tables():
        t = published(paper_table(label, (paper_parts(label) or [None])[0])["id"])
        assert t["source"] == paper_source(label)
    assert paper_source("2") == "ABKD paper (ICML 2025), Table 2"
    assert paper_source("3/10") == "ABKD paper (ICML 2025), Tables 3 and 10"
    assert paper_source("Fig. 5") == "ABKD paper (ICML 2025), Fig. 5"
    assert paper_parts(2) == ["GPT-2 (0.1B)", "GPT-2 Medium (0.3B)", "GPT-2 Large (0.8B)"]
    assert paper_parts(9) == ["GPT-2 Medium (0.3B)", "GPT-2 Large (0.8B)", "GPT-2 XL (1.5B)"]
    assert len(paper_parts(16)) == 12 and paper_parts(13) == []


def test_every_source_label():
    "Every entry names its source: the paper's tables exactly by their label, every other table by its own origin."
    data = load_published()
    for tid, t in data["tables"].items():
        if "paper_table" in t:
            label = t["paper_table"]
            assert t["source"] == paper_source(label) and re.fullmatch(r"ABKD paper \(ICML 2025\), (Tables? [\d a-z]+|Fig\. \d+)",
                                                                          t["source"]), tid
            assert published(tid)["source"] == paper_table(label, (paper_parts(label) or [None])[0])["source"]
        else:   # a peer's table: it names itself, says whether it is primary or secondary, never passes as the paper's
            assert not t["source"].startswith("ABKD paper"), tid
            assert re.search(r"primary|secondary", t["source"], re.I), tid
    for hid, h in data["hyperparameters"].items():
        assert h["source"] == paper_source(h["paper_table"]) == f"ABKD paper (ICML 2025), Table {h['paper_table']}", hid
    for sid, s in data["training"].items():
        for fid, f in s["facts"].items():
            assert f["source"].startswith(("ABKD paper (ICML 2025), ", "official code ghwang-s/abkd")), (sid, fid)
            if "official" in f: assert f["official"]["source"].strip(), (sid, fid)
    assert paper_source("13") == "ABKD paper (ICML 2025), Table 13"


def test_llm_tables_equal_the_transcription(md):
    seen = Compared()
    _, lines = _section(md, "Table 2")
    part = None
    for line in lines:
        if line.startswith("-- "): part = line.split("->")[1].strip(); continue
        label, cells = _row(line)
        if label == "GPT-2 XL (Teacher)":                                    # shared by the three blocks
            for p in paper_parts(2): seen.check("2", p, "Teacher", LLM, cells)
        else: seen.check("2", part, label, LLM, cells)
    seen.assert_complete("2")
    _, lines = _section(md, "Table 3 / Table 10")
    rename = {"alpha-div": "α-divergence", "beta-div": "β-divergence", "AB-div": "α-β-divergence"}
    for line in lines:
        label, cells = _row(line.split("(Tab.10)")[0])
        seen.check("3/10", None, rename.get(label, label), LLM, cells)
    seen.assert_complete("3/10")
    _, lines = _section(md, "Table 8")
    rename = {"Fixed+Ours": "Fixed + Ours", "On-policy+Ours": "On-policy + Ours", "Mixed+Ours": "Mixed + Ours",
              "AdaptiveOff+Ours": "Adaptive Off-policy + Ours"}
    for line in lines:
        label, cells = _row(line)
        seen.check("8", None, rename.get(label, label), LLM, cells, std=False)   # the transcription has no std here
    seen.assert_complete("8")
    _, lines = _section(md, "Table 9")
    for line in lines:
        teacher, rest = line.split(":", 1)
        part = "GPT-2 " + teacher.replace("(", " (")
        for row, chunk in zip(["FKLD", "RKLD", "α-β-divergence"], rest.split("|")):
            seen.check("9", part, row, LLM, CELL.findall(chunk), std=False)
    seen.assert_complete("9", skip_parts=["GPT-2 XL (1.5B)"])                   # checked against Table 3 below
    for row in ["FKLD", "RKLD", "α-β-divergence"]:
        for c in LLM:
            assert paper_number(9, row, c, "GPT-2 XL (1.5B)") == paper_number("3/10", row, c)
            assert paper_std(9, row, c, "GPT-2 XL (1.5B)") == paper_std("3/10", row, c)
    for name, prefix, cols in [("11", "Table 11", LLM),
                               ("12", "Table 12", ["GSM8K", "MATH", "GaoKao 2023 En", "OlympiadBench", "CollegeMath", "Avg"])]:
        _, lines = _section(md, prefix)
        for chunk in " | ".join(lines).split("|"):
            label, cells = _row(chunk)
            seen.check(name, None, label, cols, cells, std=False)
        seen.assert_complete(name)


def test_llm_tables_agree_with_each_other():
    "The paper repeats rows across tables; the JSON holds each as printed, so the repeats must agree."
    for c in LLM:
        assert paper_number(2, "ABKD", c, "GPT-2 (0.1B)") == paper_number("3/10", "α-β-divergence", c) \
               == paper_number(8, "Fixed + Ours", c)
        assert paper_std(2, "ABKD", c, "GPT-2 (0.1B)") == paper_std(8, "Fixed + Ours", c)
        assert paper_number(2, "KD", c, "GPT-2 (0.1B)") == paper_number("3/10", "FKLD", c)
        # Table 8's "Prior SOTA" is, per column, the best baseline of Table 2's GPT-2 (0.1B) block, std included
        block = paper_table(2, "GPT-2 (0.1B)")["rows"]
        best = max((r for r in block if r not in ("Teacher", "ABKD")), key=lambda r: block[r][c])
        assert paper_number(8, "Prior SOTA", c) == paper_number(2, best, c, "GPT-2 (0.1B)")
        assert paper_std(8, "Prior SOTA", c) == paper_std(2, best, c, "GPT-2 (0.1B)")
    assert all(paper_std(11, r, c) is not None for r in paper_table(11)["rows"] for c in LLM)
    with pytest.raises(ValueError, match="Table 12 prints no std"):
        paper_std(12, "ABKD", "GSM8K")


def test_a_cell_without_a_value_says_what_its_row_reports(monkeypatch):
    "A row that leaves a column blank: the error names the cell and the columns the row does report."
    tables = json.loads(json.dumps(R._published_tables()))
    del tables["abkd_table15"]["rows"]["1.2"]["-0.3"]
    monkeypatch.setattr(R, "_published_tables", lambda: tables)
    assert paper_number(15, "1.2", "-0.1") == 70.81
    with pytest.raises(ValueError, match=r"Table 15 prints no value for \(1\.2, -0\.3\); row '1\.2' reports: -0\.1, -0\.5$"):
        paper_number(15, "1.2", "-0.3")
    assert "| 1.2 | 70.81 |  | 70.35 |" in paper_markdown(15)           # the blank cell renders blank, not as a number


def test_cifar_tables_equal_the_transcription(md):
    seen = Compared()
    head, lines = _section(md, "Table 13")
    student, acc = re.search(r"student (\w+) = (" + NUM + ")", head).groups()
    a, b = re.search(rf"alpha=({NUM}) beta=({NUM})", head).groups()
    for line in lines:
        teacher, *chunks = [x.strip() for x in line.split("|")]
        name, t_acc = teacher.split()
        p = pair_label(name, student)
        cells = [(acc, ""), (t_acc, "")] + [CELL.findall(ch)[0] for ch in chunks]
        seen.check("13", None, p, ["Student", "Teacher", "FKLD", "RKLD", "α-β-divergence"], cells)
        assert paper_hyperparameters(13, p) == (float(a), float(b))
    seen.assert_complete("13")
    _, lines = _section(md, "Table 14")
    t = paper_table(14)
    (row,) = t["rows"]
    assert row == pair_label("ResNet50", "vgg8")
    for part in lines[0].split(";"):
        (base, v0), (ab, v1) = re.findall(rf"(\w+) ({NUM})", part)
        gain = re.search(rf"\(\+({NUM})\)", part).group(1)
        seen.check("14", None, row, [base, ab], [(v0, ""), (v1, "")])
        assert round(paper_number(14, row, ab) - paper_number(14, row, base), 2) == float(gain)   # the printed gain
    seen.assert_complete("14")
    head, lines = _section(md, "Table 15")
    betas = ["-0.1", "-0.3", "-0.5"]
    assert "beta = " + ", ".join(betas) in lines[0]
    for chunk in lines[0].split("(beta")[0].split(";"):
        alpha, vals = chunk.split(":")
        seen.check("15", None, alpha.strip().removeprefix("a="), betas, CELL.findall(vals))
    seen.assert_complete("15")
    fig = paper_table("Fig. 5")
    assert list(fig["rows"]) == [p for p, _ in paper_settings(4)][::4]              # the same 8 pairs, same order
    assert {v for r in fig["rows"].values() for v in r.values()} == {"Fig. 5 only"}
    assert len(fig["rows"]) * len(fig["columns"]) == 64 and fig["markers"] == ["Fig. 5 only"]


def test_table16_equals_the_transcription(md):
    seen = Compared()
    _, lines = _section(md, "Table 16")
    rows = {"T": "Teacher", "PSRC": "PromptSRC", "Ours": "ABKD"}
    for line in lines:
        name, rest = line.split(":", 1)
        for chunk in rest.split("|"):
            label, cells = _row(chunk)
            seen.check("16", DATASET.get(name, name), rows.get(label, label), ["Base", "Novel", "HM"], cells)
    seen.assert_complete("16")
    assert len(seen.cells) == 12 * 9 * 3
    # the average block is the mean of the 11 datasets for the rows the paper ran itself: the mean of the printed
    # (rounded) values and the printed (rounded) mean each lie within 0.005 of the exact mean
    for row in ["Teacher", "KD", "DKD", "LSD", "ABKD"]:
        for c in ["Base", "Novel", "HM"]:
            mean = sum(paper_number(16, row, c, d) for d in paper_parts(16)[1:]) / 11
            assert abs(mean - paper_number(16, row, c, "Average (11 datasets)")) <= 0.01 + 1e-9, (row, c)


def test_hyperparameter_tables_equal_the_transcription(md):
    _, lines = _section(md, "Table 4")
    pairs = [pair_label(*map(_model, p.strip().split(">"))) for p in _section(md, "Table 4")[0].split("pairs:")[1].split(",")]
    assert len(pairs) == 8
    expected = {}
    for line in lines:
        method, rest = line.split(":")
        for p, (a, b) in zip(pairs, re.findall(rf"\(({NUM}),({NUM})\)", rest), strict=True):
            expected[(p, method.strip())] = (float(a), float(b))
    assert len(expected) == 32 and paper_settings(4) == expected
    assert all(paper_hyperparameters(4, p, m) == ab for (p, m), ab in expected.items())
    head, _ = _section(md, "Table 6")
    found = re.findall(rf"(\w+) ({NUM})/({NUM})", head.split(":", 1)[1])
    expected = {(DATASET.get(d, d),): (float(a), float(b)) for d, a, b in found}
    assert len(expected) == 11 and paper_settings(6) == expected
    head, _ = _section(md, "Table 7")
    a, b = re.search(rf"alpha=({NUM}) beta=({NUM})", head).groups()
    assert paper_settings(7) == {(c,): (float(a), float(b)) for c in LLM}
    assert sum(len(paper_settings(t)) for t in paper_hyperparameter_tables()) == 32 + 11 + 5 + 4


def test_training_facts_carry_their_sources():
    assert training_fact("cifar100", "kd_weight") == 32
    kd = training_facts("cifar100")["kd_weight"]
    assert kd["source"] == "ABKD paper (ICML 2025), App. I.2.3" and kd["official"]["value"] == 64
    assert training_fact("base_to_new", "lr") == 0.005 and training_facts("base_to_new")["lr"]["official"]["value"] == 1e-4
    assert training_fact("base_to_new", "kd_weight_grid") == [100, 200, 300, 500, 1000, 2000, 3000]
    assert training_fact("instruction_following", "lr_grid") == [5e-4, 1e-4, 5e-5]
    assert training_fact("instruction_following", "ce_weight") == 0
    assert training_fact("cifar100_ablsd", "temperature") == 2
    assert "official code" in training_facts("cifar100")["temperature"]["source"]   # the paper states no T
    for setting in ("cifar100", "cifar100_ablsd", "base_to_new", "instruction_following"):
        for f in training_facts(setting).values():
            assert f["source"].startswith(("ABKD paper (ICML 2025), ", "official code ghwang-s/abkd"))
    facts = training_facts("cifar100"); facts.clear()
    assert training_facts("cifar100")                                              # callers get copies


@pytest.mark.parametrize("call, message", [
    (lambda: paper_table(5), "no table 5 of results here; known tables: 2, 3/10, 8, 9, 11, 12, 13, 14, 15, 16, Fig. 5"),
    (lambda: paper_number(4, "vgg13 → vgg8", "ABKD"),
     "no table 4 of results here (Table 4 is an α, β table: read it with paper_hyperparameters)"),
    (lambda: paper_table(2), "Table 2 has one block per student: pass part= one of GPT-2 (0.1B), GPT-2 Medium"),
    (lambda: paper_table(2, "GPT-2 XL"),
     "Table 2 has no student 'GPT-2 XL'; its students: GPT-2 (0.1B), GPT-2 Medium (0.3B), GPT-2 Large (0.8B)"),
    (lambda: paper_number(16, "ABKD", "HM", "CIFAR10"), "Table 16 has no dataset 'CIFAR10'; its datasets: Average (11 datasets), ImageNet"),
    (lambda: paper_markdown(16, "CIFAR10"), "Table 16 has no dataset 'CIFAR10'; its datasets: Average (11 datasets), ImageNet"),
    (lambda: paper_markdown(16), "Table 16 has one block per dataset: pass part= one of Average (11 datasets), ImageNet"),
    (lambda: paper_number(2, "WSD", "Dolly", "GPT-2 (0.1B)"),
     "Table 2 (student GPT-2 (0.1B)) has no row 'WSD'; its rows: Teacher, SFT, KD, SeqKD, MiniLLM, GKD, DISTILLM, ABKD"),
    (lambda: paper_std(16, "ABKD", "HM", "DTD"),
     "Table 16 (dataset DTD) prints no std (one value per cell); the tables with a std: 2, 3/10, 8, 9, 11, 13"),
    (lambda: paper_std(12, "ABKD", "GSM8K"), "Table 12 prints no std (one value per cell); the tables with a std: 2, 3/10"),
    (lambda: paper_std(13, pair_label("resnet56", "resnet20"), "Teacher"),
     "Table 13 prints no std beside (resnet56 → resnet20, Teacher); it prints one in the columns FKLD, RKLD, α-β-divergence"),
    (lambda: paper_std("Fig. 5", pair_label("vgg13", "vgg8"), "ABKD"), "the cell is marked 'Fig. 5 only' (The paper shows"),
    (lambda: paper_std(2, "ABKD", "HM", "GPT-2 (0.1B)"), "Table 2 (student GPT-2 (0.1B)) does not report 'HM'; its columns: Dolly"),
    (lambda: paper_table(13, "resnet20"), "Table 13 is one block"),
    (lambda: paper_number(16, "ABKD", "top5", "DTD"), "Table 16 (dataset DTD) does not report 'top5'; its columns: Base, Novel, HM"),
    (lambda: paper_number(12, "GKD", "MATH"), "Table 12 has no row 'GKD'; its rows: Teacher, Student, SeqKD, KD, ABKD"),
    (lambda: paper_number("Fig. 5", pair_label("vgg13", "vgg8"), "ABKD"), "prints no number for (vgg13 → vgg8, ABKD): the cell is marked 'Fig. 5 only'"),
    (lambda: paper_std(13, pair_label("resnet8", "resnet20"), "FKLD"), "Table 13 has no row 'resnet8 → resnet20'"),
    (lambda: paper_hyperparameters(4, pair_label("resnet56", "resnet8"), "ABKD"), "Table 4 has no pair 'resnet56 → resnet8'; known pairs: wrn_40_2 → wrn_16_2"),
    (lambda: paper_hyperparameters(4, pair_label("resnet56", "resnet20"), "abkd"), "no method 'abkd' for pair 'resnet56 → resnet20'; known methods: ABKD, ABDKD, ABLSD, ABTTM"),
    (lambda: paper_hyperparameters(6, "CIFAR10"), "Table 6 has no dataset 'CIFAR10'; known datasets: ImageNet, Caltech101"),
    (lambda: paper_hyperparameters(7, "Alpaca"), "Table 7 has no dataset 'Alpaca'; known datasets: Dolly, SelfInst, Vicuna, S-NI, UnNI"),
    (lambda: paper_hyperparameters(13, pair_label("resnet56", "resnet8")), "Table 13 has no pair 'resnet56 → resnet8'; known pairs: resnet32 → resnet20"),
    (lambda: paper_hyperparameters(4, "resnet56 → resnet20"), "Table 4 is looked up by (pair, method), got 1 key(s)"),
    (lambda: paper_hyperparameters(16, "DTD"),
     "no α, β table 16 here (Table 16 holds results: read it with paper_number); known tables: 4, 6, 7, 13"),
    (lambda: paper_hyperparameters(5, "DTD"), "no α, β table 5 here; known tables: 4, 6, 7, 13"),
    (lambda: paper_hyperparameters(4, pair_label("ResNet50", "vgg8"), "ABKD"),
     "Table 4 has no pair 'ResNet50 → vgg8'; known pairs: wrn_40_2 → wrn_16_2"),
    (lambda: training_facts("imagenet"), "no training facts for 'imagenet'; known settings: cifar100, cifar100_ablsd, base_to_new"),
    (lambda: training_fact("cifar100", "warmup"), "no fact 'warmup' for 'cifar100'; known facts: batch_size"),
])
def test_reader_errors_list_what_exists(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


def test_paper_table_flattens_one_block_and_renders_as_printed():
    t = paper_table(2, "GPT-2 Medium (0.3B)")
    assert list(t["rows"])[0] == "Teacher" and len(t["rows"]) == 8 and t["part"] == "GPT-2 Medium (0.3B)"
    assert t["source"] == "ABKD paper (ICML 2025), Table 2"
    assert paper_number(2, "Teacher", "UnNI", "GPT-2 Large (0.8B)") == 29.05
    assert paper_std(2, "Teacher", "UnNI", "GPT-2 Large (0.8B)") == 0.14
    assert paper_table("3")["id"] == paper_table(10)["id"] == paper_table("abkd_table3_10")["id"] == "abkd_table3_10"
    lines = paper_markdown(13).splitlines()
    assert lines[0] == "| teacher → student | Student | Teacher | FKLD | RKLD | α-β-divergence |"
    assert "| resnet56 → resnet20 | 69.06 | 72.34 | 70.66 (0.24) | 71.43 (0.16) | 71.79 (0.16) |" in lines
    assert "Source: ABKD paper (ICML 2025), Table 13." in paper_markdown(13)
    assert "| 1.2 | 70.81 | 71.10 | 70.35 |" in paper_markdown(15)
    assert "| Teacher | 95.5 | 82.8 | 66.8 | 38.5 | 37.7 | 64.3 |" in paper_markdown(12)     # one decimal, as printed
    p = pair_label("resnet56", "resnet20")
    md_ = render_table([p], ["ABKD"], {p: {"ABKD": [71.0]}}, paper_table("Fig. 5"))
    assert f"| {p} | 71.00 (n=1) | Fig. 5 only [1] |" in md_ and "ABKD paper (ICML 2025), Fig. 5" in md_
    paper_table(13)["rows"].clear()
    assert len(paper_table(13)["rows"]) == 4                                          # callers get copies


def _corrupted(tmp_path, change):
    data = json.loads((Path(R.__file__).parent / "data" / "published.json").read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / "published.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tables"]["abkd_table14"]["rows"]["ResNet50 → vgg8"].update(KD="73.81"),
     "tables.abkd_table14.rows.ResNet50 → vgg8.KD: '73.81' is neither a finite number nor one of the table's markers []"),
    (lambda d: d["tables"]["abkd_table13"]["rows"]["resnet32 → resnet20"].update(KL=1.0),
     "tables.abkd_table13.rows.resnet32 → resnet20: columns ['KL'] are not among the table's columns"),
    (lambda d: d["tables"]["abkd_table8"]["std"].update(GKD={"Dolly": 0.1}),
     "tables.abkd_table8.std.GKD: row 'GKD' has a std but no values"),
    (lambda d: d["tables"]["abkd_table2"]["parts"]["GPT-2 (0.1B)"]["std"]["KD"].update(Dolly=-0.37),
     "tables.abkd_table2.parts.GPT-2 (0.1B).std.KD.Dolly: -0.37 is not a non-negative number"),
    (lambda d: d["tables"]["abkd_table2"]["parts"]["GPT-2 (0.1B)"]["rows"].update(Teacher={"Dolly": 1.0}),
     "tables.abkd_table2.parts.GPT-2 (0.1B): rows ['Teacher'] are also shared rows of the table"),
    (lambda d: d["tables"]["abkd_table9"].pop("part_name"), "tables.abkd_table9: parts and part_name go together"),
    (lambda d: d["tables"]["abkd_table16"].update(source="ABKD paper, Table 16"),
     "tables.abkd_table16.source: 'ABKD paper, Table 16' should be 'ABKD paper (ICML 2025), Table 16'"),
    (lambda d: d["tables"]["abkd_table12"].pop("source"), "tables.abkd_table12: missing keys ['source']"),
    (lambda d: d["tables"]["cifar100_ttm"].pop("source"), "tables.cifar100_ttm: missing keys ['source']"),
    (lambda d: d["tables"]["cifar100_ttm"].update(source="  "), "tables.cifar100_ttm.source: must name where the numbers come from"),
    (lambda d: d["tables"]["cifar100_ttm"].update(source="ABKD paper (Wang et al., ICML 2025), CIFAR-100 tables."),
     "tables.cifar100_ttm.source: 'ABKD paper (Wang et al., ICML 2025), CIFAR-100 tables.' cites the ABKD paper "
     "without a paper_table label: the paper's own tables carry paper_table and the source 'ABKD paper (ICML 2025), Table N'"),
    (lambda d: d["tables"]["cifar100_ttm"].update(rows={}, missing="paper value not recorded"),
     "tables.cifar100_ttm.rows: the table holds no row"),
    (lambda d: [p["rows"].clear() for p in d["tables"]["abkd_table16"]["parts"].values()],
     "tables.abkd_table16.rows: the table holds no row"),
    (lambda d: d["hyperparameters"]["table6"].pop("source"), "hyperparameters.table6: missing keys ['source']"),
    (lambda d: d["hyperparameters"]["table6"].update(source="ABKD paper"),
     "hyperparameters.table6.source: 'ABKD paper' should be 'ABKD paper (ICML 2025), Table 6'"),
    (lambda d: d["training"]["cifar100"]["facts"]["kd_weight"]["official"].pop("source"),
     "training.cifar100.facts.kd_weight.official: missing keys ['source']"),
    (lambda d: d["training"]["cifar100"]["facts"]["lr"].update(source=" "), "training.cifar100.facts.lr: needs a value and a source"),
    (lambda d: d["tables"]["abkd_table12"].update(stds={}), "tables.abkd_table12: unknown keys ['stds']"),
    (lambda d: d["tables"]["abkd_table12"].update(decimals="1"), "tables.abkd_table12.decimals: must be of type int, got str"),
    (lambda d: d["tables"]["abkd_table15"]["rows"]["1.2"].update({"-0.1": float("nan")}), "is neither a finite number"),
    (lambda d: d["tables"]["abkd_fig5"].update(markers=[]), "'Fig. 5 only' is neither a finite number nor one of"),
    (lambda d: d["tables"]["abkd_table11"].update(paper_table="2"), "tables.abkd_table11.source"),
    (lambda d: d["hyperparameters"]["table6"]["settings"].update(DTD=[1.0]),
     "hyperparameters.table6.settings.DTD: [1.0] is not a pair [alpha, beta] of numbers"),
    (lambda d: d["hyperparameters"]["table4"]["settings"]["vgg13 → vgg8"].update(ABKD=["0.9", 0.2]),
     "hyperparameters.table4.settings.vgg13 → vgg8.ABKD: ['0.9', 0.2] is not a pair"),
    (lambda d: d["hyperparameters"]["table7"].update(settings={"Dolly": [0.2, 0.7]}),
     "hyperparameters.table7.settings: {'Dolly': [0.2, 0.7]} is not a pair"),
    (lambda d: d["training"]["cifar100"]["facts"]["lr"].pop("source"), "training.cifar100.facts.lr: missing keys ['source']"),
    (lambda d: d.update(schema_version=2), "schema_version: 2 unsupported"),
])
def test_schema_is_checked_on_load(tmp_path, change, message):
    path = _corrupted(tmp_path, change)
    with pytest.raises(ValueError) as e:
        load_published(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_schema_check_passes_the_packaged_file_and_names_bad_json(tmp_path):
    assert load_published()["tables"].keys() == set(published_tables())
    assert load_published(_corrupted(tmp_path, lambda d: None))["schema_version"] == 1   # an unchanged copy loads
    bad = tmp_path / "broken.json"
    bad.write_text('{"tables": ')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_published(bad)
