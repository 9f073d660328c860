"""GPU benchmark: the α-β divergence of `abkd` beside autograd, torch.compile and cross-entropy, bf16, forward + backward.

Run once on one CUDA card, from the repository root (sized to finish in under 5 minutes on an H100/H200):

    python bench/bench_gpu.py                    # all three sections, 5 timed passes each
    python bench/bench_gpu.py --quick            # 2 timed passes each
    python bench/bench_gpu.py --dry-run --no-save   # the same code on the CPU, tiny shapes, Triton interpreted

Sections (alpha=0.2, beta=0.7, bf16 logits, forward + backward, CUDA-event times, median after warm-up):

1. device-to-device copy bandwidth; the floor of a shape is 6·N·V bytes (read s and t, write the gradient, bf16)
   divided by it;
2. [N, V] logits at 8192×50257 and 4096×151936: abkd's Triton kernel, abkd's chunked path, the official-style
   formulation, plain autograd through the log-space formula, torch.compile of that formula and F.cross_entropy
   (student logits against the teacher's argmax, a speed reference), plus a Triton-vs-chunked check;
3. fused linear at (N, H_student, H_teacher, V) = (8192, 768, 1600, 50257) and (4096, 4096, 4096, 151936):
   `abkd.ab_divergence_from_hidden` (the fused-linear kernel of `abkd.kernels.fused_linear` behind the front) against
   materialized logits followed by the Triton
   kernel or by the compiled log-space formula, and Liger-Kernel's fused-linear JSD when it is installed.

Every implementation is wrapped: an out-of-memory error or a missing package prints "failed: reason" in its
row and the run goes on. Results are saved through `abkd.results.save_record` (experiment `bench_gpu`) to
bench/results/gpu_<card>.json unless --no-save. See bench/README.md for the meaning of every column.
"""
from __future__ import annotations

import argparse, gc, importlib.util, math, os, platform, re, statistics, sys, time
from pathlib import Path

# --dry-run interprets the Triton kernels on the CPU: the flag must be set before triton is first imported
if "--dry-run" in sys.argv[1:]: os.environ["TRITON_INTERPRET"] = "1"

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path: sys.path.insert(0, str(REPO_ROOT))   # run from a checkout without installing
if str(BENCH_DIR) not in sys.path: sys.path.insert(0, str(BENCH_DIR))

import torch
import torch.nn.functional as F

from bench_cpu import abkd_source_digest
from official_style import ab_divergence_log_general, ab_divergence_official_style

ALPHA, BETA = 0.2, 0.7
DTYPE = torch.bfloat16
FLOOR_BYTES_PER_ELEMENT = 6          # bf16: read student and teacher logits, write the student gradient

LOGIT_SHAPES = [(8192, 50257), (4096, 151936)]                              # (N, V)
FUSED_SHAPES = [(8192, 768, 1600, 50257), (4096, 4096, 4096, 151936)]       # (N, H_student, H_teacher, V)
COPY_BYTES = 2 * 2**30
DRY_LOGIT_SHAPES = [(4, 1000), (2, 1500)]
DRY_FUSED_SHAPES = [(4, 16, 24, 1000), (2, 8, 12, 1500)]
DRY_COPY_BYTES = 8 * 2**20
REPEATS, QUICK_REPEATS, DRY_REPEATS = 5, 2, 1

COPY_LABEL = "device-to-device copy"
# id -> table label, in the order they run (the Triton kernel first: the others are compared with it)
LOGIT_IMPLS = {
    "triton": "abkd Triton kernel (impl='triton')",
    "chunked": "abkd chunked path (impl='chunked')",
    "official_style": "official-style (probability space)",
    "log_general": "plain autograd (log-space general formula)",
    "compiled_log": "torch.compile (log-space general formula)",
    "cross_entropy": "F.cross_entropy (teacher argmax, speed reference)",
}
LOGIT_REFERENCE = "triton"
FUSED_IMPLS = {
    "fused": "abkd fused linear (ab_divergence_from_hidden, impl='triton')",
    "materialized_triton": "materialized logits + abkd Triton kernel",
    "materialized_compiled": "materialized logits + torch.compile log-space",
    "liger_jsd": "Liger fused-linear JSD (jsd_beta=0.5)",
}
FUSED_REFERENCE = "fused"
FUSED_SKIP_NOTE = "section 3 skipped"
LIGER_MISSING = "not installed (pip install liger-kernel)"
CPU_SKIP = "skipped on CPU"


# ------------------------------------------------------------------------------------------------ measuring
class Device:
    "Timing (CUDA events on a GPU, perf_counter on the CPU) and peak extra memory (GPU only) on one device."

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def sync(self):
        if self.cuda: torch.cuda.synchronize(self.device)

    def time_ms(self, fn) -> float:
        "Wall time of fn() in ms, the device work included."
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter(); fn()
        return (time.perf_counter() - t0) * 1e3

    def peak_extra(self, fn):
        "(fn(), GiB allocated at the peak of fn above what was allocated before it); None for the GiB off CUDA."
        if not self.cuda: return fn(), None
        gc.collect(); self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = fn(); self.sync()
        return out, (torch.cuda.max_memory_allocated(self.device) - before) / 2**30

    def free(self):
        gc.collect()
        if self.cuda: torch.cuda.empty_cache()


def measure(step, reset, dev: Device, repeats: int, max_seconds: float) -> dict:
    """Time `step` (one forward + backward, returns the detached loss); `reset` drops the gradients before each call.

    Call 1 is the warm-up (Triton JIT, torch.compile); call 2 measures the peak extra memory and gives the loss;
    then `repeats` timed calls (fewer once they have taken `max_seconds`)."""
    reset(); t0 = time.perf_counter(); step(); dev.sync()
    first_s = time.perf_counter() - t0
    reset(); loss, gib = dev.peak_extra(step)
    out = {"first_call_s": first_s, "loss": float(loss)}
    if gib is not None: out["peak_extra_gib"] = gib
    times = []
    for _ in range(repeats):
        reset(); times.append(dev.time_ms(step))
        if sum(times) >= max_seconds * 1e3: break
    reset()
    out.update(times_ms=times, ms=statistics.median(times), min_ms=min(times), runs=len(times))
    return out


def _reason(e: BaseException) -> str:
    "One short line for a failed implementation."
    if isinstance(e, torch.cuda.OutOfMemoryError): return "out of memory"
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    msg = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return msg if len(msg) <= 160 else msg[:157] + "..."


def guarded(fn, dev: Device) -> dict:
    "fn() (a result dict), or {'error': reason} if it raised; memory is released either way."
    try:
        return fn()
    except Exception as e:           # out of memory, a compile failure, a missing package: report and go on
        return {"error": _reason(e)}
    finally:
        dev.free()


def report(label: str, r: dict) -> None:
    "Progress line for one implementation."
    if "error" in r: msg = f"failed: {r['error']}"
    elif "skipped" in r: msg = r["skipped"]
    else:
        gib = "" if r.get("peak_extra_gib") is None else f", peak extra {r['peak_extra_gib']:.2f} GiB"
        msg = f"median {r['ms']:.3f} ms over {r['runs']}{gib} (first call {r['first_call_s']:.1f} s)"
    print(f"  {label}: {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def _gib(r: dict) -> str:
    return "n/a" if r.get("peak_extra_gib") is None else f"{r['peak_extra_gib']:.2f}"


def render(head: list, rows: list) -> str:
    "Aligned table; a row given as (label, message) prints the message after the label instead of the columns."
    full = [r for r in rows if isinstance(r, list)]
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(head)]
    widths[0] = max([widths[0]] + [len(r[0]) for r in rows])
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])]
    for r in rows:
        out.append(line(r) if isinstance(r, list) else f"{r[0].ljust(widths[0])}  {r[1]}")
    return "\n".join(out)


def _message_row(label: str, r: dict):
    if "error" in r: return (label, f"failed: {r['error']}")
    if "skipped" in r: return (label, r["skipped"])
    return None


def _rel(x, ref):
    return None if x is None or ref is None or ref == 0 else abs(x - ref) / abs(ref)


# ------------------------------------------------------------------------------------------------ section 1
def copy_bandwidth(dev: Device, nbytes: int, repeats: int) -> dict:
    "Median time of one device-to-device copy of `nbytes` and the bandwidth it gives (bytes read + written / s)."
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    for _ in range(2): dst.copy_(src)
    dev.sync()
    times = [dev.time_ms(lambda: dst.copy_(src)) for _ in range(repeats)]
    del src, dst
    dev.free()
    ms = statistics.median(times)
    return {"bytes": nbytes, "ms": ms, "times_ms": times, "bandwidth_gbs": 2 * nbytes / (ms * 1e-3) / 1e9}


# ------------------------------------------------------------------------------------------------ section 2
def make_logits(n: int, v: int, seed: int, device):
    "Seeded standard-normal bf16 student (requires grad) and teacher logits [n, v] on `device`."
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).to(DTYPE).requires_grad_()
    t = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).to(DTYPE)
    return s, t


def log_space_sum(s, t):
    "Σ over rows of the general log-space formula, computed in float32 (the usual upcast of bf16 logits)."
    return ab_divergence_log_general(s.float(), t.float(), ALPHA, BETA).sum()


def logit_impls(dev: Device, compile_ok: bool) -> dict:
    "id -> loss(s, t, teacher_argmax) (a scalar to backward), or a 'skip' string."
    import abkd
    skip_compile = CPU_SKIP if not dev.cuda else (None if compile_ok else "skipped (--no-compile)")
    return {
        "triton": lambda s, t, lab: abkd.ab_divergence(s, t, ALPHA, BETA, reduction="sum", impl="triton"),
        "chunked": lambda s, t, lab: abkd.ab_divergence(s, t, ALPHA, BETA, reduction="sum", impl="chunked"),
        "official_style": lambda s, t, lab: ab_divergence_official_style(s.float(), t.float(), ALPHA, BETA).sum(),
        "log_general": lambda s, t, lab: log_space_sum(s, t),
        "compiled_log": skip_compile or (lambda c: (lambda s, t, lab: c(s, t)))(torch.compile(log_space_sum, dynamic=False)),
        "cross_entropy": lambda s, t, lab: F.cross_entropy(s, lab, reduction="sum"),
    }


def check_triton_vs_chunked(s, t, dev: Device) -> dict:
    "Per-row values and student gradients of the Triton kernel against the chunked path."
    import abkd
    out = {}
    rows, grads = {}, {}
    for impl in ("triton", "chunked"):
        x = s.detach().requires_grad_()
        r = abkd.ab_divergence(x, t, ALPHA, BETA, reduction="none", impl=impl)
        r.sum().backward()
        rows[impl], grads[impl] = r.detach().double(), x.grad
        del x, r
    d = (rows["triton"] - rows["chunked"]).abs()
    out["loss_rows_max_rel_diff"] = float((d / rows["chunked"].abs().clamp_min(1e-30)).max())
    out["loss_sum_rel_diff"] = float(abs(rows["triton"].sum() - rows["chunked"].sum()) / rows["chunked"].sum().abs())
    gmax = float(grads["chunked"].float().abs().max())
    out["grad_max_abs_diff_rel"] = float((grads["triton"].float() - grads["chunked"].float()).abs().max()) / gmax
    del rows, grads
    dev.free()
    return out


def section_logits(shapes, dev: Device, args, bandwidth_gbs: float) -> dict:
    results = {}
    for n, v in shapes:
        key = f"{n}x{v}"
        floor_ms = FLOOR_BYTES_PER_ELEMENT * n * v / (bandwidth_gbs * 1e9) * 1e3
        print(f"\n[N={n}, V={v}] bf16 logits {n * v * 2 / 2**30:.2f} GiB each; floor {floor_ms:.3f} ms", flush=True)
        s, t = make_logits(n, v, args.seed, dev.device)
        lab = t.argmax(-1)
        impls = logit_impls(dev, not args.no_compile)
        shape_res = {"floor_ms": floor_ms}

        def reset(): s.grad = None
        for impl, fn in impls.items():
            if isinstance(fn, str): r = {"skipped": fn}
            else:
                def step(fn=fn):
                    loss = fn(s, t, lab); loss.backward(); return loss.detach()
                r = guarded(lambda: measure(step, reset, dev, args.repeats, args.max_seconds), dev)
            shape_res[impl] = r
            report(LOGIT_IMPLS[impl], r)
        shape_res["check"] = guarded(lambda: check_triton_vs_chunked(s, t, dev), dev)
        del s, t, lab, impls
        dev.free()
        results[key] = shape_res
    return results


def print_logits(results: dict) -> None:
    head = ["impl", "ms", "min ms", "runs", "peak extra GiB", "× floor", "× triton", "loss rel Δ", "first call s"]
    for key, res in results.items():
        n, v = key.split("x")
        ref = res.get(LOGIT_REFERENCE, {})
        rows = []
        for impl, label in LOGIT_IMPLS.items():
            r = res[impl]
            m = _message_row(label, r)
            if m: rows.append(m); continue
            for k, x in (("x_floor", r["ms"] / res["floor_ms"]),
                         ("x_ref", r["ms"] / ref["ms"] if "ms" in ref else None),
                         ("loss_rel_diff", None if impl == "cross_entropy" else _rel(r["loss"], ref.get("loss")))):
                if x is not None: r[k] = x
            rows.append([label, f"{r['ms']:.3f}", f"{r['min_ms']:.3f}", str(r["runs"]), _gib(r),
                         _fmt(r.get("x_floor"), ".2f"), _fmt(r.get("x_ref"), ".2f"),
                         "(ref)" if impl == LOGIT_REFERENCE else
                         ("n/a" if impl == "cross_entropy" else _fmt(r.get("loss_rel_diff"), ".1e")),
                         f"{r['first_call_s']:.1f}"])
        print(f"\nN={n} V={v}, bf16, forward + backward; floor = 6·N·V B / copy bandwidth = {res['floor_ms']:.3f} ms")
        print(render(head, rows))
        c = res["check"]
        if "error" in c: print(f"Triton vs chunked check failed: {c['error']}")
        else:
            print(f"Triton vs chunked: max relative per-row loss difference {c['loss_rows_max_rel_diff']:.2e}, "
                  f"relative difference of the loss sum {c['loss_sum_rel_diff']:.2e}, "
                  f"max |Δgrad| / max |grad| {c['grad_max_abs_diff_rel']:.2e} (bf16 gradients)")


# ------------------------------------------------------------------------------------------------ section 3
def make_hidden(n, hs, ht, v, seed, device):
    "Seeded bf16 hidden states ~ N(0, 1) and head weights ~ N(0, 1/H) (logits ~ N(0, 1)); the student's require grad."
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(DTYPE)
    h_s = rnd(n, hs).requires_grad_()
    w_s = rnd(v, hs, scale=hs ** -0.5).requires_grad_()
    h_t = rnd(n, ht)
    w_t = rnd(v, ht, scale=ht ** -0.5)
    return h_s, w_s, h_t, w_t


def liger_fn():
    "Liger-Kernel's fused-linear JSD as f(h_s, w_s, h_t, w_t), or a string saying why it is unavailable."
    if importlib.util.find_spec("liger_kernel") is None: return LIGER_MISSING
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_jsd
        return lambda h_s, w_s, h_t, w_t: liger_fused_linear_jsd(h_s, w_s, h_t, w_t, jsd_beta=0.5)
    except ImportError:
        pass
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as e:
        return f"failed: {_reason(e)}"
    module = LigerFusedLinearJSD(jsd_beta=0.5)

    def f(h_s, w_s, h_t, w_t):
        try: return module(h_s, w_s, h_t, w_t, None)          # versions with shift_labels
        except TypeError: return module(h_s, w_s, h_t, w_t)  # older versions
    return f


def fused_impls(from_hidden, dev: Device, compile_ok: bool) -> dict:
    import abkd
    skip_compile = CPU_SKIP if not dev.cuda else (None if compile_ok else "skipped (--no-compile)")

    def materialize(h_s, w_s, h_t, w_t):
        ls = h_s @ w_s.T
        with torch.no_grad(): lt = h_t @ w_t.T
        return ls, lt

    def compiled(c):
        return lambda h_s, w_s, h_t, w_t: c(*materialize(h_s, w_s, h_t, w_t))
    liger = liger_fn()
    return {
        "fused": lambda h_s, w_s, h_t, w_t: from_hidden(h_s, w_s, (h_t, w_t), ALPHA, BETA, reduction="sum",
                                                                impl="triton"),
        "materialized_triton": lambda h_s, w_s, h_t, w_t: abkd.ab_divergence(
            *materialize(h_s, w_s, h_t, w_t), ALPHA, BETA, reduction="sum", impl="triton"),
        "materialized_compiled": skip_compile or compiled(torch.compile(log_space_sum, dynamic=False)),
        "liger_jsd": liger,
    }


def section_fused(shapes, dev: Device, args) -> dict | str:
    try:
        from abkd.core import ab_divergence_from_hidden
    except Exception as e:
        note = (f"{FUSED_SKIP_NOTE}: abkd.core.ab_divergence_from_hidden is not importable "
                f"({_reason(e)})")
        print(f"\n{note}", flush=True)
        return note
    results = {}
    for n, hs, ht, v in shapes:
        key = f"{n}x{hs}x{ht}x{v}"
        flops = 2 * n * v * (3 * hs + ht)     # student logits, their two backward matmuls, teacher logits
        print(f"\n[N={n}, H_student={hs}, H_teacher={ht}, V={v}] bf16; {flops / 1e12:.2f} TFLOP of matmuls per "
              f"forward + backward", flush=True)
        h_s, w_s, h_t, w_t = make_hidden(n, hs, ht, v, args.seed, dev.device)
        impls = fused_impls(ab_divergence_from_hidden, dev, not args.no_compile)
        shape_res = {"matmul_flops": flops}

        def reset(): h_s.grad = None; w_s.grad = None
        for impl, fn in impls.items():
            if isinstance(fn, str):
                r = {"error": fn[len("failed: "):]} if fn.startswith("failed: ") else {"skipped": fn}
            else:
                def step(fn=fn):
                    loss = fn(h_s, w_s, h_t, w_t); loss.backward(); return loss.detach()
                r = guarded(lambda: measure(step, reset, dev, args.repeats, args.max_seconds), dev)
            shape_res[impl] = r
            report(FUSED_IMPLS[impl], r)
        del h_s, w_s, h_t, w_t, impls
        dev.free()
        results[key] = shape_res
    return results


def print_fused(results) -> None:
    if isinstance(results, str):
        print(f"\n{results}")
        return
    head = ["impl", "ms", "min ms", "runs", "peak extra GiB", "× ours time", "× ours mem", "matmul TFLOP/s",
            "loss rel Δ", "first call s"]
    for key, res in results.items():
        n, hs, ht, v = key.split("x")
        ref = res.get(FUSED_REFERENCE, {})
        rows = []
        for impl, label in FUSED_IMPLS.items():
            r = res[impl]
            m = _message_row(label, r)
            if m: rows.append(m); continue
            ref_gib = ref.get("peak_extra_gib")
            for k, x in (("x_ref", r["ms"] / ref["ms"] if "ms" in ref else None),
                         ("x_ref_mem", r["peak_extra_gib"] / ref_gib if ref_gib and "peak_extra_gib" in r else None),
                         ("matmul_tflops", res["matmul_flops"] / (r["ms"] * 1e-3) / 1e12),
                         ("loss_rel_diff", None if impl == "liger_jsd" else _rel(r["loss"], ref.get("loss")))):
                if x is not None: r[k] = x
            rows.append([label, f"{r['ms']:.3f}", f"{r['min_ms']:.3f}", str(r["runs"]), _gib(r),
                         _fmt(r.get("x_ref"), ".2f"), _fmt(r.get("x_ref_mem"), ".2f", "n/a" if ref_gib is None else "—"),
                         f"{r['matmul_tflops']:.1f}",
                         "(ref)" if impl == FUSED_REFERENCE else
                         ("n/a" if impl == "liger_jsd" else _fmt(r.get("loss_rel_diff"), ".1e")),
                         f"{r['first_call_s']:.1f}"])
        print(f"\nfused linear N={n} H_student={hs} H_teacher={ht} V={v}, bf16, teacher given as (hidden, weight), "
              f"forward + backward (gradients to the student's hidden states and head weight)")
        print(render(head, rows))


# ------------------------------------------------------------------------------------------------ record
NUMERIC_KEYS = ("ms", "min_ms", "times_ms", "runs", "first_call_s", "peak_extra_gib", "loss", "x_floor", "x_ref",
                "x_ref_mem", "matmul_tflops", "loss_rel_diff", "loss_rows_max_rel_diff", "loss_sum_rel_diff",
                "grad_max_abs_diff_rel", "floor_ms", "matmul_flops", "bytes", "bandwidth_gbs")


def _finite(x) -> bool:
    if isinstance(x, list): return all(_finite(v) for v in x)
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def metrics_and_status(copy: dict, logits: dict, fused) -> tuple[dict, dict]:
    "(numbers only, for save_record's metrics; the failures, skips and non-finite values, for its config)."
    status = {}

    def numbers(d: dict, where: str) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                if "error" in v: status[f"{where}.{k}"] = f"failed: {v['error']}"
                elif "skipped" in v: status[f"{where}.{k}"] = v["skipped"]
                sub = numbers(v, f"{where}.{k}")
                if sub: out[k] = sub
            elif k in NUMERIC_KEYS:
                if _finite(v): out[k] = v
                else: status[f"{where}.{k}"] = f"non-finite: {v!r}"
        return out
    metrics = {"copy": numbers(copy, "copy"), "logits": numbers(logits, "logits")}
    if isinstance(fused, str): status["fused_linear"] = fused
    else: metrics["fused_linear"] = numbers(fused, "fused_linear")
    return metrics, status


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} timed passes instead of {REPEATS}")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the same code on the CPU with tiny shapes, 1 pass, Triton interpreted "
                         "(TRITON_INTERPRET=1); memory reads n/a and torch.compile is skipped")
    ap.add_argument("--repeats", type=int, default=None, help=f"timed passes (default {REPEATS}; {QUICK_REPEATS} "
                                                               f"with --quick, {DRY_REPEATS} with --dry-run)")
    ap.add_argument("--max-seconds", type=float, default=10.0,
                    help="stop an implementation's timed passes once they have taken this long (default 10)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random logits and hidden states (default 0)")
    ap.add_argument("--out", default=None, help="JSON record path (default bench/results/gpu_<card>.json)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no JSON record")
    args = ap.parse_args(argv)
    if args.repeats is None: args.repeats = DRY_REPEATS if args.dry_run else QUICK_REPEATS if args.quick else REPEATS
    if args.repeats < 1: ap.error("--repeats must be positive")

    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:
                print("warning: triton was imported before --dry-run could set TRITON_INTERPRET=1", file=sys.stderr)
            os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        card = "cpu (dry run)"
        logit_shapes, fused_shapes, copy_bytes = DRY_LOGIT_SHAPES, DRY_FUSED_SHAPES, DRY_COPY_BYTES
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: this benchmark needs one GPU (use --dry-run for a CPU check of the script)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        card = torch.cuda.get_device_name(device)
        logit_shapes, fused_shapes, copy_bytes = LOGIT_SHAPES, FUSED_SHAPES, COPY_BYTES
    dev = Device(device)

    import abkd
    try:
        import triton; triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not importable ({_reason(e)})"
    liger_version = None
    if importlib.util.find_spec("liger_kernel") is not None:
        from importlib import metadata
        try: liger_version = metadata.version("liger-kernel")
        except metadata.PackageNotFoundError: liger_version = "unknown"
    source = abkd_source_digest()
    print(f"card: {card}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton_version}  "
          f"abkd {abkd.__version__}  python {platform.python_version()}  liger-kernel {liger_version or 'not installed'}")
    print(f"alpha={ALPHA} beta={BETA}  bf16  forward + backward  {args.repeats} timed passes after 2 warm-up calls "
          f"(the second measures memory)  {'TRITON_INTERPRET=1, CPU, tiny shapes' if args.dry_run else ''}",
          flush=True)
    t_start = time.perf_counter()

    print("\n== 1. copy bandwidth ==", flush=True)
    copy = copy_bandwidth(dev, copy_bytes, max(args.repeats, 1 if args.dry_run else 10))
    print("\n== 2. α-β divergence on [N, V] logits ==", flush=True)
    logits = section_logits(logit_shapes, dev, args, copy["bandwidth_gbs"])
    print("\n== 3. fused linear (hidden states and head weights in, no logits kept) ==", flush=True)
    fused = section_fused(fused_shapes, dev, args)
    total_s = time.perf_counter() - t_start

    print(f"\n\n== results: {card} ==")
    print(f"\n1. copy bandwidth")
    print(render(["copy", "GiB", "ms", "GB/s (read + write)"],
                 [[COPY_LABEL, f"{copy['bytes'] / 2**30:.3f}", f"{copy['ms']:.3f}", f"{copy['bandwidth_gbs']:.0f}"]]))
    print(f"\n2. α-β divergence (α={ALPHA}, β={BETA}) on [N, V] bf16 logits")
    print_logits(logits)
    print(f"\n3. fused linear (α={ALPHA}, β={BETA})")
    print_fused(fused)
    print(f"\nms: median of the timed forward + backward passes ({'perf_counter' if not dev.cuda else 'CUDA events'}); "
          f"peak extra GiB: max_memory_allocated above memory_allocated before the call (gradient and temporaries "
          f"included; n/a on the CPU); × floor: ms / (6·N·V bytes / copy bandwidth); × triton, × ours: ratio to the "
          f"reference row; loss rel Δ: |loss − reference loss| / |reference loss|; first call s: the warm-up call "
          f"(JIT or torch.compile included).")
    changed = abkd_source_digest() != source
    if changed: print("warning: the abkd sources changed during the run; rows may come from different code, rerun")
    print(f"total {total_s:.1f} s")

    if not args.no_save:
        from abkd.results import save_record
        out = Path(args.out) if args.out else BENCH_DIR / "results" / (
            "gpu_dry-run-cpu.json" if args.dry_run else f"gpu_{slug(card)}.json")
        metrics, status = metrics_and_status(copy, logits, fused)
        config = {"card": card, "device": str(device), "dry_run": args.dry_run, "dtype": "bfloat16",
                  "alpha": ALPHA, "beta": BETA, "repeats": args.repeats, "warmup_calls": 2,
                  "max_seconds": args.max_seconds, "no_compile": args.no_compile,
                  "logit_shapes": [list(x) for x in logit_shapes], "fused_shapes": [list(x) for x in fused_shapes],
                  "copy_bytes": copy_bytes, "floor_bytes_per_element": FLOOR_BYTES_PER_ELEMENT,
                  "logits": "bf16 of torch.randn (student, then teacher) from a generator seeded with seed",
                  "hidden": "bf16 hidden ~ N(0, 1), head weights ~ N(0, 1/H), student's then teacher's",
                  "logit_implementations": LOGIT_IMPLS, "fused_implementations": FUSED_IMPLS,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
                  "liger_kernel": liger_version, "abkd_source_sha256_16": source, "abkd_source_changed": changed,
                  "triton_interpret": os.environ.get("TRITON_INTERPRET"), "total_s": total_s, "status": status}
        save_record(out, experiment="bench_gpu", config=config, metrics=metrics, seed=args.seed,
                    notes="median CUDA-event time of forward + backward and peak extra allocated memory of one "
                          "forward + backward, bf16, one process; see bench/README.md")
        print(f"saved {out}")
    ours_failed = any("error" in res.get(LOGIT_REFERENCE, {}) for res in logits.values())
    return 1 if ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())
