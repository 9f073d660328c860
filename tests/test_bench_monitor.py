"""The monitor benchmark runs end to end at a tiny size and prints and records every timing, ratio and statistic."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_monitor_tiny(tmp_path):
    out = tmp_path / "monitor.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_monitor.py"), "--n", "40", "--v", "300",
                        "--hidden", "16", "--monitor-rows", "8", "--repeats", "2", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for text in ("monitor before", "monitor now", "KD loss forward", "fused-mode monitor", "fused KD loss forward",
                 "monitor_over_loss", "monitor_all_over_loss", "fused_monitor_over_fused_loss",
                 "all 40 positions", "8 sampled", "monitor now / loss forward ="):
        assert text in r.stdout, text
    rec = json.loads(out.read_text())
    assert rec["experiment"] == "bench_monitor"
    assert {k: rec["config"][k] for k in ("n", "v", "hidden", "monitor_rows", "repeats")} == \
        dict(n=40, v=300, hidden=16, monitor_rows=8, repeats=2)
    m = rec["metrics"]
    timed = ("monitor_all", "monitor", "loss_forward", "fused_monitor", "fused_loss_forward")
    for k in timed:
        assert len(m[k]["times_ms"]) == 2 and m[k]["time_ms"] > 0
    assert m["monitor_over_loss"] == m["monitor"]["time_ms"] / m["loss_forward"]["time_ms"]
    assert m["fused_monitor_over_fused_loss"] == m["fused_monitor"]["time_ms"] / m["fused_loss_forward"]["time_ms"]
    assert (m["rows"], m["supervised"]) == (8, 40)
    assert m["stats_all"].keys() == m["stats_sampled"].keys() == m["stats_fused_sampled"].keys()
    assert "tv_error" in m["stats_all"]


def test_bench_monitor_refuses_bad_sizes():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_monitor.py"), "--n", "0", "--no-save"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be positive" in r.stderr
