"""The CIFAR training-pipeline GPU check's dry run (CPU, 256 random images, one epoch through the real trainer)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_cifar_gpu.py"


def test_bench_cifar_gpu_dry_run():
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--no-save"], capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "images/s" in r.stdout, r.stdout[-3000:]
