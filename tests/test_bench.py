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
    for name in ("abkd", "plain autograd", "official-style"):
        assert name in r.stdout
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    assert set(m) == {"abkd", "abkd_reference", "plain_branch_free", "plain_log_general", "official_style"}
    assert m["abkd_reference"]["loss_rows_max_rel_diff"] < 1e-5            # the core and the chunked path agree
    assert m["abkd"]["time_ratio"] == 1.0 and m["abkd"]["mem_ratio"] == 1.0
    assert m["plain_branch_free"]["loss_rows_max_rel_diff"] < 1e-5         # same formula, same values
    assert m["official_style"]["loss_rows_max_rel_diff"] < 1e-4            # away from the boundary it agrees
