"""CPU benchmark: `abkd.ab_divergence` beside three plain-autograd baselines, forward + backward.

Run from the repository root:

    python bench/bench_cpu.py            # N=512, V=50257, float32, alpha=0.2, beta=0.7 (2-3.5 minutes on 2 cores)
    python bench/bench_cpu.py --quick    # N=64, V=5000, 2 repeats (10-30 s; used by the smoke test)
    python bench/bench_cpu.py --contend  # also abkd, abkd compiled and official-style beside one competing process

With --contend the side-by-side runs twice in one invocation: first every implementation on the otherwise idle
machine, then the implementations of --contend-impls (default abkd, abkd_compiled, official-style) again while one competing
CPU-bound process runs (this script re-invoked with --compete: a single-threaded pure-Python loop, or a
single-threaded torch matmul loop with --competitor matmul). The ratios official / abkd and official / abkd compiled,
idle and contended, go into the record; abkd_compiled's first call (the torch.compile) is timed apart as first_call_ms.

Each implementation runs in its own fresh Python process (this script re-invoked with --child). That process
builds the seeded logits, resets the resident-memory high-water mark with `memory.reset_high_water`
(bench/memory.py), runs one forward+backward (the warm-up) and reports the extra peak resident memory read with
`memory.resident_high_water_kib` — the same measurement as `memory.peak_memory_mib` — then
times --repeats further forward+backward passes with `time.perf_counter`. The parent only collects, prints
and saves (through `abkd.results.save_record`), so no implementation's allocations or threads disturb another's.
See bench/README.md for the meaning of every column.
"""
from __future__ import annotations

import argparse, json, os, platform, resource, statistics, subprocess, sys, tempfile, time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path: sys.path.insert(0, str(REPO_ROOT))   # run from a checkout without installing
if str(BENCH_DIR) not in sys.path: sys.path.insert(0, str(BENCH_DIR))

import torch

# id -> table label, in the order they run (abkd first: the others are compared with it)
IMPLS = {
    "abkd": "abkd (chunked kernel path, the CPU default)",
    "abkd_compiled": "abkd compiled (torch.compile of the chunked math, opt-in)",
    "abkd_reference": "abkd impl='reference' (the closed-form core)",
    "plain_branch_free": "plain autograd (branch-free log-space formula)",
    "plain_log_general": "plain autograd (log-space general formula)",
    "official_style": "official-style (probability space)",
}
REFERENCE = "abkd"
CLAIM = ("abkd", "official_style")          # the pair whose time ratio the README claims, idle and contended
COMPILED_CLAIM = ("abkd_compiled", "official_style")   # the same ratio for the compiled variant
CONTEND_DEFAULT = ("abkd", "abkd_compiled", "official_style")
COMPETITORS = ("python", "matmul")
DEFAULTS = dict(n=512, v=50257, repeats=5)
QUICK = dict(n=64, v=5000, repeats=2)


# ---------------------------------------------------------------------------------------------- implementations
def _impl_fns(impl: str):
    """(rows_fn, loss_fn) of `impl`: per-row divergence values, and the scalar loss that is timed.

    loss_fn(s, t) equals rows_fn(s, t).sum() up to rounding; for abkd it is the public call with reduction="sum"."""
    import abkd
    from abkd.gradients import ab_divergence_autograd
    from official_style import ab_divergence_log_general, ab_divergence_official_style
    if impl == "abkd_compiled":                      # the front's checks and reduction, then the compiled kernels
        from abkd.divergence import apply_divergence, check_ab_logit_values, check_hyperparameters
        from abkd.kernels.torch_chunked import ab_divergence_compiled

        def compiled(s, t, a, b, reduction):
            a, b, temperature = check_hyperparameters(a, b, 1.0)
            return apply_divergence(lambda s, t: ab_divergence_compiled(s, t, a, b, temperature), s, t,
                                    reduction=reduction, check_values=lambda s, t: check_ab_logit_values(s, t, a, b))
        return (lambda s, t, a, b: compiled(s, t, a, b, "none"), lambda s, t, a, b: compiled(s, t, a, b, "sum"))
    if impl in ("abkd", "abkd_reference"):
        kind = "chunked" if impl == "abkd" else "reference"
        return (lambda s, t, a, b: abkd.ab_divergence(s, t, a, b, reduction="none", impl=kind),
                lambda s, t, a, b: abkd.ab_divergence(s, t, a, b, reduction="sum", impl=kind))
    rows = {"plain_branch_free": ab_divergence_autograd,
            "plain_log_general": ab_divergence_log_general,
            "official_style": ab_divergence_official_style}[impl]
    return rows, (lambda s, t, a, b: rows(s, t, a, b).sum())


def abkd_source_digest() -> str:
    "sha256 (first 16 hex digits) of the abkd package's .py sources as imported, to catch edits during a run."
    import hashlib, abkd
    h = hashlib.sha256()
    for f in sorted(Path(abkd.__file__).resolve().parent.rglob("*.py")):
        h.update(f.name.encode()); h.update(f.read_bytes())
    return h.hexdigest()[:16]


def make_logits(n: int, v: int, seed: int):
    "Seeded standard-normal float32 student (requires grad) and teacher logits of shape [n, v]."
    torch.manual_seed(seed)
    s = torch.randn(n, v, dtype=torch.float32).requires_grad_()
    t = torch.randn(n, v, dtype=torch.float32)
    return s, t


# --------------------------------------------------------------------------------------------------- child side
def run_child(args) -> dict:
    "Measure one implementation in this (fresh) process; return a JSON-able dict."
    from memory import reset_high_water, resident_high_water_kib
    torch.set_num_threads(args.threads)
    impl, a, b = args.child, args.alpha, args.beta
    rows_fn, loss_fn = _impl_fns(impl)
    s, t = make_logits(args.n, args.v, args.seed)
    out = {"impl": impl, "threads": torch.get_num_threads(), "abkd_source": abkd_source_digest()}

    # 0. a small forward + backward first, so that the code pages and lazy initialisations of the kernels this
    #    implementation uses are resident before the high-water mark is reset (otherwise tens of MiB of shared
    #    library pages are counted as "extra memory")
    try:
        tiny_rows = min(args.n, max(2, -(-65536 // args.v)))      # >= 64Ki elements: the threaded kernels too
        tiny_s, tiny_t = make_logits(tiny_rows, args.v, args.seed)
        t0 = time.perf_counter()
        rows_fn(tiny_s, tiny_t, a, b).sum().backward()         # abkd_compiled: torch.compile runs here
        out["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        del tiny_s, tiny_t
    except ValueError as e:                          # e.g. the general formula at alpha = 0
        return {**out, "error": str(e)}

    # 1. warm-up = the peak-memory run: one forward + backward from a reset high-water mark
    reset_high_water()
    before_kib = resident_high_water_kib()
    t0 = time.perf_counter()
    try:
        rows = rows_fn(s, t, a, b)
    except ValueError as e:                          # e.g. the general formula at alpha = 0
        return {**out, "error": str(e)}
    rows.sum().backward()
    out["warmup_ms"] = (time.perf_counter() - t0) * 1e3
    out["peak_extra_mib"] = (resident_high_water_kib() - before_kib) / 1024
    rows, grad = rows.detach(), s.grad
    s.grad = None

    # 2. timed forward + backward passes (stop early once --max-seconds of timed runs are spent)
    times, ru0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeats):
        s.grad = None
        t0 = time.perf_counter()
        loss_fn(s, t, a, b).backward()
        times.append(time.perf_counter() - t0)
        if sum(times) >= args.max_seconds: break
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    s.grad = None
    out["times_ms"] = [x * 1e3 for x in times]
    # CPU seconds per timed pass: user ≈ threads × wall when the threads run unhindered; sys counts page faults
    out["cpu_user_s_per_run"] = (ru1.ru_utime - ru0.ru_utime) / len(times)
    out["cpu_sys_s_per_run"] = (ru1.ru_stime - ru0.ru_stime) / len(times)

    # 3. values: the loss, and the per-row values and gradient compared with abkd's (saved by abkd's child)
    out["loss_sum"] = float(rows.double().sum())
    out["rows_finite"] = bool(torch.isfinite(rows).all())
    ref = Path(args.workdir) / f"{REFERENCE}.pt"
    if impl == REFERENCE:
        torch.save({"rows": rows, "grad": grad}, ref)
    elif ref.exists():
        r = torch.load(ref)
        d_rows = (rows.double() - r["rows"].double()).abs()
        d_grad = (grad.double() - r["grad"].double()).abs()
        out["loss_rows_max_abs_diff"] = float(d_rows.max())
        out["loss_rows_max_rel_diff"] = float((d_rows / r["rows"].double().abs().clamp_min(1e-30)).max())
        out["loss_sum_abs_diff"] = abs(out["loss_sum"] - float(r["rows"].double().sum()))
        out["grad_max_abs_diff"] = float(d_grad.max())
        out["grad_max_abs"] = float(r["grad"].abs().max())
    return out


# ----------------------------------------------------------------------------------------------- competitor side
def compete(kind: str) -> None:
    "Burn one CPU until killed: a pure-Python loop, or torch matmuls of 256×256 float32 on one thread."
    if kind == "matmul":
        torch.set_num_threads(1)
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        while True: a = torch.mm(a, b).mul_(1 / 16)          # the scale keeps the values finite
    x = 0
    while True: x = (x + 1) % 1_000_003


def start_competitor(kind: str) -> subprocess.Popen:
    "One competing CPU-bound process (this script with --compete), running until `stop_competitor`."
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--compete", kind], env=env,
                         cwd=str(REPO_ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)                                          # let it start (and import torch for matmul)
    if p.poll() is not None: raise RuntimeError(f"the competing process ({kind}) exited with code {p.returncode}")
    return p


def stop_competitor(p: subprocess.Popen) -> None:
    p.kill(); p.wait()


def process_cpu_s(pid: int):
    "CPU seconds (user + system) used so far by process `pid`, from /proc/<pid>/stat, or None."
    try:
        with open(f"/proc/{pid}/stat") as f: fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError): return None


# -------------------------------------------------------------------------------------------------- parent side
def cpu_model() -> str:
    "CPU model name from /proc/cpuinfo, else platform.processor()."
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def _loadavg():
    try: return list(os.getloadavg())
    except OSError: return None


def _cpu_busy_s():
    "Seconds of busy CPU time summed over all CPUs since boot (from /proc/stat, steal included), or None."
    try:
        with open("/proc/stat") as f: fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError): return None
    busy = sum(fields[:8]) - fields[3] - fields[4]          # user nice system [idle iowait] irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_for_idle(max_wait_s: float, threshold: float = 0.10, window_s: float = 2.0, windows: int = 3) -> float:
    "Wait (at most max_wait_s) until `windows` consecutive windows show < threshold CPU busy; return seconds waited."
    t0, calm = time.perf_counter(), 0
    while time.perf_counter() - t0 < max_wait_s:
        b0 = _cpu_busy_s()
        if b0 is None: break
        time.sleep(window_s)
        share = (_cpu_busy_s() - b0) / (window_s * (os.cpu_count() or 1))
        calm = calm + 1 if share < threshold else 0
        if calm >= windows: break
    return time.perf_counter() - t0


def run_impl(impl: str, args, workdir: str, competitor: subprocess.Popen | None = None) -> dict:
    "Run `impl` in a fresh subprocess (this script with --child) and return its measurements."
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--workdir", workdir,
           "--n", str(args.n), "--v", str(args.v), "--alpha", repr(args.alpha), "--beta", repr(args.beta),
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--threads", str(args.threads),
           "--max-seconds", repr(args.max_seconds)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rival0 = process_cpu_s(competitor.pid) if competitor else None
    busy0, own0, t0 = _cpu_busy_s(), _children_cpu_s(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
    wall = time.perf_counter() - t0
    busy1, own1 = _cpu_busy_s(), _children_cpu_s()
    rival1 = process_cpu_s(competitor.pid) if competitor else None
    rival = None if rival0 is None or rival1 is None else rival1 - rival0
    # share of all CPUs' time taken by *other* processes (not the competitor) while this implementation's child ran
    other = None if busy0 is None or busy1 is None else \
        max(0.0, (busy1 - busy0) - (own1 - own0) - (rival or 0.0)) / (wall * (os.cpu_count() or 1))
    if p.returncode != 0:
        return {"impl": impl, "error": f"child process failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}",
                "process_s": wall}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    if other is not None: res["other_cpu_share"] = other
    if rival is not None: res["competitor_cpu_share"] = rival / (wall * (os.cpu_count() or 1))
    return res


def measure_all(impls: list, args, competitor: str | None = None) -> dict:
    "Run each implementation in its own fresh process, in order (abkd first), beside a competitor if one is named."
    results = {}
    with tempfile.TemporaryDirectory(prefix="abkd_bench_") as workdir:
        for impl in impls:
            if args.wait_idle > 0:
                waited = wait_for_idle(args.wait_idle)
                if waited > 7: print(f"  (waited {waited:.0f} s for the CPUs to go idle)", flush=True)
            rival = start_competitor(competitor) if competitor else None
            try: r = run_impl(impl, args, workdir, rival)
            finally:
                if rival: stop_competitor(rival)
            results[impl] = r
            msg = r["error"].splitlines()[-1] if "error" in r else \
                (f"median {statistics.median(r['times_ms']):.0f} ms over {len(r['times_ms'])} "
                 f"(CPU user {r['cpu_user_s_per_run']:.2f} s, sys {r['cpu_sys_s_per_run']:.2f} s per pass), "
                 f"peak {r['peak_extra_mib']:.0f} MiB"
                 + (f", first call (compile) {r['first_call_ms'] / 1e3:.1f} s" if impl == "abkd_compiled" else ""))
            print(f"  {IMPLS[impl]}: {msg}  ({r['process_s']:.1f} s)", flush=True)
    return results


def claim_ratios(results: dict, contended: dict) -> dict:
    "official-style time / abkd time (and / abkd compiled time), idle and (if measured) beside the competitor."
    def ratio(res, pair):
        a, b = (res.get(i, {}) for i in pair)
        return b["time_ms"] / a["time_ms"] if "time_ms" in a and "time_ms" in b and a["time_ms"] > 0 else None
    out = {"official_over_abkd_idle": ratio(results, CLAIM), "official_over_abkd_contended": ratio(contended, CLAIM),
           "official_over_compiled_idle": ratio(results, COMPILED_CLAIM),
           "official_over_compiled_contended": ratio(contended, COMPILED_CLAIM)}
    return {k: v for k, v in out.items() if v is not None}


def _fmt(x, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def summarize(results: dict, n: int, v: int) -> dict:
    "Add median time, ratios to abkd and memory in gradient units to each successful result."
    grad_mib = n * v * 4 / 2**20
    ref = results.get(REFERENCE, {})
    for r in results.values():
        if "error" in r: continue
        r["time_ms"] = statistics.median(r["times_ms"])
        r["runs"] = len(r["times_ms"])
        r["peak_in_gradients"] = r["peak_extra_mib"] / grad_mib
        if "time_ms" in ref and ref["time_ms"] > 0: r["time_ratio"] = r["time_ms"] / ref["time_ms"]
        if "peak_extra_mib" in ref and ref["peak_extra_mib"] > 0:
            r["mem_ratio"] = r["peak_extra_mib"] / ref["peak_extra_mib"]
    return results


def table(results: dict) -> str:
    head = ["impl", "time ms", "min ms", "runs", "× abkd time", "peak extra MiB", "× abkd mem", "peak / grad",
            "max|Δloss| row", "max|Δgrad|", "other load"]
    rows = []
    for impl, label in IMPLS.items():
        r = results.get(impl)
        if r is None: continue
        if "error" in r:
            rows.append([label + " [error, below]"] + ["n/a"] * (len(head) - 1)); continue
        ref = impl == REFERENCE
        rows.append([label, f"{r['time_ms']:.0f}", f"{min(r['times_ms']):.0f}", str(r["runs"]),
                     _fmt(r.get("time_ratio"), ".2f"),
                     f"{r['peak_extra_mib']:.0f}", _fmt(r.get("mem_ratio"), ".2f"), f"{r['peak_in_gradients']:.2f}",
                     "(ref)" if ref else _fmt(r.get("loss_rows_max_abs_diff"), ".2e"),
                     "(ref)" if ref else _fmt(r.get("grad_max_abs_diff"), ".2e"),
                     _fmt(r.get("other_cpu_share"), ".0%")])
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    errors = [f"error in {IMPLS[i]}: {r['error'].strip().splitlines()[-1]}" for i, r in results.items() if "error" in r]
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] + errors)


def metrics_of(results: dict) -> dict:
    "Numbers only (save_record rejects anything else), keyed by implementation id."
    keep = ("time_ms", "times_ms", "runs", "first_call_ms", "warmup_ms", "cpu_user_s_per_run", "cpu_sys_s_per_run", "time_ratio",
            "peak_extra_mib", "mem_ratio", "peak_in_gradients", "loss_sum", "loss_rows_max_abs_diff", "loss_rows_max_rel_diff", "loss_sum_abs_diff",
            "grad_max_abs_diff", "grad_max_abs", "process_s", "other_cpu_share", "competitor_cpu_share")
    return {impl: {k: r[k] for k in keep if k in r} for impl, r in results.items() if "error" not in r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help=f"rows (default {DEFAULTS['n']}; {QUICK['n']} with --quick)")
    ap.add_argument("--v", type=int, default=None, help=f"vocabulary (default {DEFAULTS['v']}; {QUICK['v']} with --quick)")
    ap.add_argument("--alpha", type=float, default=0.2, help="alpha (default 0.2)")
    ap.add_argument("--beta", type=float, default=0.7, help="beta (default 0.7)")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed forward+backward passes after 1 warm-up (default {DEFAULTS['repeats']}; "
                         f"{QUICK['repeats']} with --quick)")
    ap.add_argument("--max-seconds", type=float, default=40.0,
                    help="stop an implementation's timed passes early once they have taken this long "
                         "(at least 1 run; default 40)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each implementation, wait up to this long for other processes to leave the CPUs idle "
                         "(default 0: do not wait)")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the logits (default 0)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in each child (default: torch.get_num_threads(), here %(default)s)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--quick", action="store_true", help=f"N={QUICK['n']}, V={QUICK['v']}, repeats={QUICK['repeats']}")
    ap.add_argument("--out", default=None, help="JSON record path (default bench/results/cpu_<N>x<V>.json)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no JSON record")
    ap.add_argument("--contend", action="store_true",
                    help="after the idle side-by-side, run --contend-impls again beside one competing CPU-bound process")
    ap.add_argument("--contend-impls", default=",".join(CONTEND_DEFAULT),
                    help="implementations measured beside the competitor (default %(default)s)")
    ap.add_argument("--competitor", choices=COMPETITORS, default="python",
                    help="the competing process: a single-threaded pure-Python loop (default) or torch matmul loop")
    ap.add_argument("--child", choices=list(IMPLS), help=argparse.SUPPRESS)
    ap.add_argument("--compete", choices=COMPETITORS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k in ("n", "v", "repeats"):
        if getattr(args, k) is None: setattr(args, k, base[k])
    if args.n < 1 or args.v < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--n, --v, --repeats and --threads must be positive")

    if args.compete:
        compete(args.compete)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad: ap.error(f"unknown implementation(s) {bad}; choose from {list(IMPLS)}")
    impls = [i for i in IMPLS if i in impls]          # fixed order, abkd first
    contend_impls = [i.strip() for i in args.contend_impls.split(",") if i.strip()] if args.contend else []
    bad = [i for i in contend_impls if i not in IMPLS]
    if bad: ap.error(f"unknown implementation(s) in --contend-impls {bad}; choose from {list(IMPLS)}")
    contend_impls = [i for i in IMPLS if i in contend_impls]

    import abkd
    grad_mib = args.n * args.v * 4 / 2**20
    wait_policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"abkd {abkd.__version__}  torch {torch.__version__}  threads {args.threads}  CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs)  python {platform.python_version()}  "
          f"OMP_WAIT_POLICY={wait_policy or '(unset)'}")
    print(f"N={args.n} V={args.v} float32 alpha={args.alpha} beta={args.beta} seed={args.seed}  "
          f"repeats={args.repeats} after 1 warm-up (max {args.max_seconds:g} s of timed passes per impl)  "
          f"one gradient = N·V·4 B = {grad_mib:.1f} MiB", flush=True)
    load_before = _loadavg()
    source = abkd_source_digest()
    t_start = time.perf_counter()
    results = measure_all(impls, args)
    contended = {}
    if contend_impls:
        print(f"beside one competing CPU-bound process ({args.competitor}, 1 thread):", flush=True)
        contended = measure_all(contend_impls, args, competitor=args.competitor)
    total_s = time.perf_counter() - t_start
    load_after = _loadavg()
    summarize(results, args.n, args.v)
    summarize(contended, args.n, args.v)
    changed = [i for res in (results, contended) for i, r in res.items() if r.get("abkd_source", source) != source]
    if changed or abkd_source_digest() != source:
        print("\nwarning: the abkd sources changed during the run (implementations affected: "
              f"{', '.join(changed) or 'none yet'}); the rows may come from different code, rerun", flush=True)
    nonfinite = [IMPLS[i] for i, r in results.items() if r.get("rows_finite") is False]
    if nonfinite: print(f"\nwarning: non-finite loss values from {', '.join(nonfinite)}", flush=True)
    busy = {i: r["other_cpu_share"] for i, r in results.items() if r.get("other_cpu_share", 0) > 0.1}
    if busy:
        print("\nwarning: other processes used " + ", ".join(f"{v:.0%} of the CPUs during {IMPLS[i]}" for i, v in
              busy.items()) + "; timings are inflated by the competition (with several threads, abkd's most: see "
              "bench/README.md), so compare times only from a run on an idle machine (try --wait-idle 300)", flush=True)
    print()
    print(table(results))
    print(f"\ntime ms: median forward+backward; peak extra MiB: resident high-water mark above the inputs in a fresh "
          f"process; peak / grad: in units of one N·V float32 gradient ({grad_mib:.1f} MiB); Δ: vs abkd (per-row loss, "
          f"gradient w.r.t. student logits); other load: share of all CPUs' time used by other processes while the "
          f"implementation ran (timings are only comparable when it is near 0%).")
    print(f"total {total_s:.1f} s; load average before {_fmt_load(load_before)}, after {_fmt_load(load_after)} "
          f"on {os.cpu_count()} CPUs")
    if contended:
        print(f"\nbeside one competing CPU-bound process ({args.competitor}, 1 thread; 'other load' excludes it):")
        print(table(contended))
    ratios = claim_ratios(results, contended)
    for key, name in (("abkd", "abkd"), ("compiled", "abkd compiled")):
        mine = {k.rsplit("_", 1)[1]: v for k, v in ratios.items() if k.startswith(f"official_over_{key}_")}
        if mine: print(f"\nofficial-style time / {name} time: " + ", ".join(f"{k} {v:.2f}×" for k, v in mine.items()))

    if not args.no_save:
        from abkd.results import save_record
        out = Path(args.out) if args.out else BENCH_DIR / "results" / f"cpu_{args.n}x{args.v}.json"
        config = {"n": args.n, "v": args.v, "dtype": "float32", "alpha": args.alpha, "beta": args.beta,
                  "repeats": args.repeats, "warmup": 1, "max_seconds": args.max_seconds, "threads": args.threads,
                  "wait_idle": args.wait_idle, "omp_wait_policy": wait_policy,
                  "contend": args.contend, "contend_impls": contend_impls,
                  "competitor": args.competitor if args.contend else None,
                  "logits": "torch.randn (student, then teacher) after torch.manual_seed(seed)",
                  "implementations": {i: IMPLS[i] for i in impls}, "reference": REFERENCE,
                  "cpu_model": cpu_model(), "torch": torch.__version__, "gradient_mib": grad_mib,
                  "abkd_source_sha256_16": source, "abkd_source_changed": bool(changed) or abkd_source_digest() != source,
                  "loadavg_before": load_before, "loadavg_after": load_after, "total_s": total_s,
                  "errors": {i: r["error"] for i, r in results.items() if "error" in r},
                  "errors_contended": {i: r["error"] for i, r in contended.items() if "error" in r}}
        metrics = metrics_of(results)
        if contended: metrics["contended"] = metrics_of(contended)
        if ratios: metrics["ratios"] = ratios
        save_record(out, experiment="bench_cpu", config=config, metrics=metrics, seed=args.seed,
                    notes="median wall time of forward+backward (time.perf_counter) and extra peak RSS (VmHWM) of one "
                          "forward+backward in a fresh process per implementation; see bench/README.md")
        print(f"saved {out}")
    return 1 if any("error" in r for res in (results, contended) for r in res.values() if r["impl"] == REFERENCE) else 0


def _fmt_load(x):
    return "n/a" if x is None else "/".join(f"{v:.2f}" for v in x)


if __name__ == "__main__":
    sys.exit(main())
