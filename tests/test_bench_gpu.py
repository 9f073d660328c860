"""The GPU benchmark's dry run (CPU, tiny shapes, Triton interpreted) goes through every section and prints every row."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_gpu.py"


def _labels():
    "The row labels and notes the script defines (loaded without running it)."
    spec = importlib.util.spec_from_file_location("bench_gpu_labels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_dry_run():
    b = _labels()
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--no-save"], capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== results:" in r.stdout, r.stdout[-3000:]
    tables = r.stdout.split("== results:", 1)[1]
    lines = tables.splitlines()

    def rows(label):
        return [x for x in lines if x.startswith(label)]

    assert rows(b.COPY_LABEL)
    for label in b.LOGIT_IMPLS.values():                 # one row per logits shape
        assert len(rows(label)) == len(b.DRY_LOGIT_SHAPES), (label, tables)
    for impl in ("triton", "chunked", "official_style", "log_general", "cross_entropy"):
        for x in rows(b.LOGIT_IMPLS[impl]):              # these run on the CPU: timed, not failed or skipped
            assert re.search(r"\d+\.\d{3}", x) and "failed" not in x and "skipped" not in x, x
    for x in rows(b.LOGIT_IMPLS["compiled_log"]):
        assert b.CPU_SKIP in x, x
    assert tables.count("Triton vs chunked: max relative per-row loss difference") == len(b.DRY_LOGIT_SHAPES)
    for v in re.findall(r"max relative per-row loss difference (\S+),", tables):
        assert float(v) < 1e-4, tables

    if b.FUSED_SKIP_NOTE in tables:                      # abkd.kernels.fused_linear not importable
        assert all(not rows(label) for label in b.FUSED_IMPLS.values())
    else:
        for label in b.FUSED_IMPLS.values():
            assert len(rows(label)) == len(b.DRY_FUSED_SHAPES), (label, tables)
        for impl in ("fused", "materialized_triton"):
            for x in rows(b.FUSED_IMPLS[impl]):
                assert re.search(r"\d+\.\d{3}", x) and "failed" not in x, x
        liger = rows(b.FUSED_IMPLS["liger_jsd"])
        if importlib.util.find_spec("liger_kernel") is None:
            assert all(b.LIGER_MISSING in x for x in liger), liger
