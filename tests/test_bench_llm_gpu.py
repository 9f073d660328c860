"""The LLM trainer GPU check's dry run (CPU, tiny GPT-2s, both losses through the real trainer)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_llm_gpu.py"


def test_bench_llm_gpu_dry_run():
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--no-save"], capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ratio abkd / plain" in r.stdout and "plain_log_space" in r.stdout, r.stdout[-3000:]


def test_bench_llm_gpu_refuses_without_cuda_or_bad_steps():
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--steps", "1", "--no-save"], capture_output=True,
                       text=True, timeout=120, cwd=str(ROOT))
    assert r.returncode == 2 and "--steps must exceed" in r.stderr
