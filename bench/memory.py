"""Peak CPU memory of one forward+backward, measured in a fresh Python process.

Shared by the benchmark scripts (`bench_cpu.py`) and the notebooks (01_gradients, 05_fused_linear), which put this
folder on `sys.path` and import `memory`. Measuring is not part of the library: nothing in `abkd` imports this file.

The measure: Linux's VmHWM (the high-water mark of resident memory) is reset to the current resident size just
before the measured step (`/proc/self/clear_refs`), with the inputs already allocated; the extra peak is the mark
after the step minus the mark before it. A fresh process per measurement, so no other implementation's
allocations, caches or thread pools are resident.

Command line (what the parent process runs): `python memory.py peak IMPL N V ALPHA BETA DTYPE` or
`python memory.py fused KIND N H_S H_T V CHUNK_TOKENS`; each prints one JSON value.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

import abkd
from abkd.core import ab_divergence_from_hidden
from abkd.gradients import ab_divergence_autograd

HERE = os.path.abspath(__file__)


def resident_high_water_kib() -> float:
    "Peak resident memory of this process in KiB (VmHWM; belongs to the address space, so it starts fresh at exec)."
    try:
        with open("/proc/self/status") as f:
            return float(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
    except (OSError, StopIteration):                           # not Linux: the rusage high-water mark
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_high_water() -> None:
    "Reset VmHWM to the current resident size (Linux ≥ 4.0); a no-op elsewhere."
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_fresh(*args) -> object:
    "Run this file with `args` in a fresh Python process (2 threads unless OMP_NUM_THREADS says otherwise); its JSON."
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run([sys.executable, HERE, *map(str, args)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"memory measurement child process {args} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------- one divergence call on [n, v] logits
PEAK_MEMORY_IMPLS = {
    "ab_divergence": lambda s, t, a, b: abkd.ab_divergence(s, t, a, b, reduction="sum", impl="reference"),
    "plain autograd": lambda s, t, a, b: ab_divergence_autograd(s, t, a, b).sum(),
}


def peak_memory_child(impl: str, n: int, v: int, alpha: float, beta: float, dtype: str) -> float:
    "One forward+backward of `impl` in this process: the extra peak resident memory in MiB."
    torch.manual_seed(0)
    s = torch.randn(n, v).to(getattr(torch, dtype)).requires_grad_()
    t = torch.randn(n, v).to(getattr(torch, dtype))
    reset_high_water()
    before = resident_high_water_kib()
    PEAK_MEMORY_IMPLS[impl](s, t, alpha, beta).backward()
    return (resident_high_water_kib() - before) / 1024


def peak_memory_mib(impl: str, n: int, v: int, alpha: float = 0.2, beta: float = 0.7, dtype: str = "float32") -> float:
    "Extra peak CPU memory (MiB) of one forward+backward of `impl` on [n, v] logits, measured in a fresh process."
    if impl not in PEAK_MEMORY_IMPLS:
        raise ValueError(f"impl must be one of {list(PEAK_MEMORY_IMPLS)}, got {impl!r}")
    return run_fresh("peak", impl, n, v, alpha, beta, dtype)


# ------------------------------------------------------------------- fused linear vs materialized logits
def fused_child(kind: str, n: int, h_s: int, h_t: int, vocab: int, chunk_tokens: int) -> dict:
    "One forward + backward of `kind` ('fused' or 'materialized') in this process: extra peak MiB and seconds."
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h_s, generator=g).requires_grad_()
    ws = (torch.randn(vocab, h_s, generator=g) / h_s**0.5).requires_grad_()
    ht, wt = torch.randn(n, h_t, generator=g), torch.randn(vocab, h_t, generator=g) / h_t**0.5

    def step():
        if kind == "fused":
            return ab_divergence_from_hidden(hs, ws, (ht, wt), 0.2, 0.7, chunk_tokens=chunk_tokens)
        return abkd.ab_divergence(hs @ ws.T, ht @ wt.T, 0.2, 0.7)
    step().backward()
    hs.grad = ws.grad = None                                   # warm-up: code pages, thread pools
    reset_high_water()
    before, t0 = resident_high_water_kib(), time.perf_counter()
    loss = step()
    loss.backward()
    return dict(seconds=time.perf_counter() - t0, peak_extra_mib=(resident_high_water_kib() - before) / 1024,
                loss=loss.item())


def fused_vs_materialized(n: int, h_s: int, h_t: int, vocab: int, chunk_tokens: int) -> dict:
    "{'materialized': ..., 'fused': ...}: `fused_child` of each path, each in a fresh Python process."
    return {kind: run_fresh("fused", kind, n, h_s, h_t, vocab, chunk_tokens) for kind in ("materialized", "fused")}


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    if what == "peak":
        impl, n, v, alpha, beta, dtype = rest
        print(json.dumps(peak_memory_child(impl, int(n), int(v), float(alpha), float(beta), dtype)))
    elif what == "fused":
        kind, *sizes = rest
        print(json.dumps(fused_child(kind, *map(int, sizes))))
    else:
        raise SystemExit(f"unknown measurement {what!r}: 'peak' or 'fused'")
