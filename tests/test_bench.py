"""The CPU benchmark runs end to end (quick mode) and reports every implementation with its ratios."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_cpu_quick(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cpu.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("abkd", "abkd compiled", "plain autograd", "official-style", "first call (compile)"):
        assert name in r.stdout
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    assert set(m) == {"abkd", "abkd_compiled", "abkd_reference", "plain_branch_free", "plain_log_general",
                      "official_style", "ratios"}
    assert set(m["ratios"]) == {"official_over_abkd_idle", "official_over_compiled_idle"}   # no --contend
    assert m["abkd_compiled"]["loss_rows_max_rel_diff"] < 1e-5             # the compiled kernels and the chunked path
    assert m["abkd_compiled"]["grad_max_abs_diff"] < 1e-5 * m["abkd_compiled"]["grad_max_abs"]
    assert m["abkd_compiled"]["first_call_ms"] > 0                         # the compile, recorded apart
    assert m["abkd_reference"]["loss_rows_max_rel_diff"] < 1e-5            # the core and the chunked path agree
    assert m["abkd"]["time_ratio"] == 1.0 and m["abkd"]["mem_ratio"] == 1.0
    assert m["plain_branch_free"]["loss_rows_max_rel_diff"] < 1e-5         # same formula, same values
    assert m["official_style"]["loss_rows_max_rel_diff"] < 1e-4            # away from the boundary it agrees


def test_bench_cpu_contend_records_both_ratios(tmp_path):
    "--contend measures the claimed pair again beside one competing process and records both ratios (no timing bound)."
    out = tmp_path / "bench_contend.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cpu.py"), "--quick", "--repeats", "1",
                        "--impls", "abkd,abkd_compiled,official_style", "--contend", "--competitor", "matmul",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "beside one competing CPU-bound process (matmul, 1 thread)" in r.stdout
    assert "official-style time / abkd time: idle" in r.stdout and "contended" in r.stdout
    assert "official-style time / abkd compiled time: idle" in r.stdout
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    assert set(m) == {"abkd", "abkd_compiled", "official_style", "contended", "ratios"}
    assert set(m["contended"]) == {"abkd", "abkd_compiled", "official_style"}          # the default --contend-impls
    assert set(m["ratios"]) == {f"official_over_{k}_{w}" for k in ("abkd", "compiled") for w in ("idle", "contended")}
    assert m["ratios"]["official_over_abkd_idle"] == m["official_style"]["time_ms"] / m["abkd"]["time_ms"]
    assert m["ratios"]["official_over_compiled_contended"] == \
        m["contended"]["official_style"]["time_ms"] / m["contended"]["abkd_compiled"]["time_ms"]
    assert all(m["contended"][i]["competitor_cpu_share"] > 0 for i in ("abkd", "abkd_compiled", "official_style"))
    assert rec["config"]["contend"] is True and rec["config"]["competitor"] == "matmul"
    assert m["contended"]["official_style"]["loss_rows_max_rel_diff"] < 1e-4                         # same values
