"""Monitor benchmark: the LLM trainer's mass-concentration monitor beside the loss forward it accompanies, one run.

Run from the repository root:

    python bench/bench_monitor.py            # N=512 positions, V=32000, H=512, monitor_rows=16 (≈ 1 minute on 2 cores)
    python bench/bench_monitor.py --quick    # N=64, V=500, H=32, 1 repeat (a few seconds; used by the smoke test)

Everything runs in this one process on the same seeded inputs: one warm-up call of each, then --repeats rounds
that time each call once in turn (so that all see the same load on a shared machine); the medians are compared
(`time.perf_counter`, CUDA synchronised on a GPU). The calls:

  monitor_all         `concentration_stats` of every supervised position — the monitor before it subsampled
  monitor             `abkd.llm.train.monitor_stats`: at most `monitor_rows` positions (the trainer's monitor now)
  loss_forward        the trainer's KD loss forward: `make_kd_loss(cfg)` on `align_next_token`'s logits
                      (student logits requiring a gradient, as in training)
  fused_monitor       `monitor_stats` from hidden states [N, H] and a head [V, H] (the fused mode: only the chosen
                      rows' logits are formed)
  fused_loss_forward  `fused_micro_batch_loss` forward (`ab_divergence_from_hidden`, hidden states and head
                      requiring a gradient)

and the ratios monitor / loss_forward, monitor_all / loss_forward, fused_monitor / fused_loss_forward, with the
statistics of all positions beside those of the sampled ones. See bench/README.md.
"""
from __future__ import annotations

import argparse, os, platform, statistics, sys, time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path: sys.path.insert(0, str(REPO_ROOT))   # run from a checkout without installing

import torch

DEFAULTS = dict(n=512, v=32000, hidden=512, repeats=5)
QUICK = dict(n=64, v=500, hidden=32, repeats=1)
TIMED = {
    "monitor_all": "monitor before (concentration_stats, every supervised position)",
    "monitor": "monitor now (monitor_stats, monitor_rows positions)",
    "loss_forward": "KD loss forward (make_kd_loss(cfg), materialized logits)",
    "fused_monitor": "fused-mode monitor (monitor_stats from hidden states and head)",
    "fused_loss_forward": "fused KD loss forward (ab_divergence_from_hidden)",
}
RATIOS = {"monitor_over_loss": ("monitor", "loss_forward"), "monitor_all_over_loss": ("monitor_all", "loss_forward"),
          "fused_monitor_over_fused_loss": ("fused_monitor", "fused_loss_forward")}


def make_inputs(n: int, v: int, hidden: int, seed: int, device: str) -> dict:
    """Seeded causal-LM outputs of one sequence of n + 1 positions (n supervised after the next-token shift):
    student and teacher logits [1, n+1, v] (standard normal), labels, hidden states [1, n+1, H] and a head [V, H]."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, n + 1, v, generator=g)
    t = torch.randn(1, n + 1, v, generator=g)
    labels = torch.randint(0, v, (1, n + 1), generator=g)
    h = torch.randn(1, n + 1, hidden, generator=g)
    w = torch.randn(v, hidden, generator=g) / hidden ** 0.5
    to = lambda x: x.to(device)
    return dict(student_logits=to(s).requires_grad_(), teacher_logits=to(t), labels=to(labels),
                hidden=to(h).requires_grad_(), head=to(w).requires_grad_())


def timed_interleaved(calls: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """({name: seconds of each of `repeats` calls}, {name: last result}): one warm-up call of each, then `repeats`
    rounds that call each once in turn, so that every call sees the same load on a shared machine."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    outputs = {}
    for name, fn in calls.items():
        outputs[name] = fn(); sync()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            outputs[name] = fn(); sync()
            times[name].append(time.perf_counter() - t0)
    return times, outputs


def measure(args) -> dict:
    "Every timed call of TIMED on the same inputs, the ratios of RATIOS and the statistics compared."
    from abkd.divergence import align_next_token
    from abkd.mass_concentration import concentration_stats
    from abkd.llm.train import LLMTrainConfig, fused_micro_batch_loss, make_kd_loss, monitor_stats
    params = dict(alpha=args.alpha, beta=args.beta)
    cfg = LLMTrainConfig(loss_params=params, monitor_rows=args.monitor_rows)
    cfg_fused = LLMTrainConfig(loss_params=params, monitor_rows=args.monitor_rows, fused_loss=True)
    kd = make_kd_loss(cfg)
    x = make_inputs(args.n, args.v, args.hidden, args.seed, args.device)
    s, t, labels, h, w = (x[k] for k in ("student_logits", "teacher_logits", "labels", "hidden", "head"))

    def monitor_all():                      # the monitor's computation before it subsampled
        s_a, t_a, _, mask = align_next_token(s, t, labels=labels)
        return concentration_stats(s_a, t_a, mask, **params)

    def loss_forward():
        s_a, t_a, _, mask = align_next_token(s, t, labels=labels)
        return kd(s_a, t_a, mask=mask)

    calls = {
        "monitor_all": monitor_all,
        "monitor": lambda: monitor_stats(cfg, s, labels, t, seed=args.seed),
        "loss_forward": loss_forward,
        "fused_monitor": lambda: monitor_stats(cfg_fused, h, labels, t, head=w, seed=args.seed),
        "fused_loss_forward": lambda: fused_micro_batch_loss(cfg_fused, h, w, labels, float(args.n), t, kd),
    }
    times, outputs = timed_interleaved(calls, args.repeats, args.device)
    results = {name: dict(time_ms=statistics.median(ts) * 1e3, times_ms=[x * 1e3 for x in ts])
               for name, ts in times.items()}
    for name, (num, den) in RATIOS.items():
        results[name] = results[num]["time_ms"] / results[den]["time_ms"]
    sampled, every = outputs["monitor"], outputs["monitor_all"]
    results["rows"], results["supervised"] = sampled["rows"], sampled["supervised"]
    results["stats_all"] = every
    results["stats_sampled"] = {k: v for k, v in sampled.items() if k not in ("rows", "supervised")}
    results["stats_fused_sampled"] = {k: v for k, v in outputs["fused_monitor"].items()
                                      if k not in ("rows", "supervised")}
    return results


def table(r: dict) -> str:
    "The timings with their ratios, then the statistics of all positions beside the sampled ones."
    lines = [f"{'call':64s} {'ms':>10s}"]
    lines += [f"{TIMED[k]:64s} {r[k]['time_ms']:10.1f}" for k in TIMED]
    lines.append("")
    lines += [f"{name:32s} {r[name]:8.3f}   ({TIMED[a].split(' (')[0]} / {TIMED[b].split(' (')[0]})"
              for name, (a, b) in RATIOS.items()]
    lines.append("")
    lines.append(f"{'statistic':28s} {'all ' + str(r['supervised']) + ' positions':>18s} "
                 f"{str(r['rows']) + ' sampled':>14s} {'|Δ|':>10s}")
    for k, v in r["stats_all"].items():
        lines.append(f"{k:28s} {v:18.4f} {r['stats_sampled'][k]:14.4f} {abs(v - r['stats_sampled'][k]):10.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help=f"supervised positions (default {DEFAULTS['n']})")
    ap.add_argument("--v", type=int, default=None, help=f"vocabulary (default {DEFAULTS['v']})")
    ap.add_argument("--hidden", type=int, default=None, help=f"hidden size of the fused mode (default {DEFAULTS['hidden']})")
    ap.add_argument("--monitor-rows", type=int, default=None,
                    help="positions the monitor samples (default: LLMTrainConfig's monitor_rows)")
    ap.add_argument("--alpha", type=float, default=0.2, help="alpha (default 0.2)")
    ap.add_argument("--beta", type=float, default=0.7, help="beta (default 0.7)")
    ap.add_argument("--repeats", type=int, default=None, help=f"timed rounds after 1 warm-up (default {DEFAULTS['repeats']})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the monitor's positions (default 0)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (default: torch.get_num_threads(), here %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--quick", action="store_true",
                    help=f"N={QUICK['n']}, V={QUICK['v']}, H={QUICK['hidden']}, repeats={QUICK['repeats']}")
    ap.add_argument("--out", default=None, help="JSON record path (default bench/results/monitor_<N>x<V>.json)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no JSON record")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k in ("n", "v", "hidden", "repeats"):
        if getattr(args, k) is None: setattr(args, k, base[k])
    from abkd.llm.train import LLMTrainConfig
    if args.monitor_rows is None: args.monitor_rows = LLMTrainConfig().monitor_rows
    if min(args.n, args.v, args.hidden, args.repeats, args.threads, args.monitor_rows) < 1:
        ap.error("--n, --v, --hidden, --repeats, --threads and --monitor-rows must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available(): ap.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)

    import abkd
    print(f"abkd {abkd.__version__}  torch {torch.__version__}  device {args.device}  threads {args.threads}  "
          f"python {platform.python_version()}  ({os.cpu_count()} logical CPUs)")
    print(f"N={args.n} V={args.v} H={args.hidden} float32 alpha={args.alpha} beta={args.beta} "
          f"monitor_rows={args.monitor_rows} seed={args.seed} repeats={args.repeats} after 1 warm-up", flush=True)
    load_before = _loadavg()
    t0 = time.perf_counter()
    r = measure(args)
    total_s = time.perf_counter() - t0
    print()
    print(table(r))
    print(f"\nmonitor now / loss forward = {r['monitor_over_loss']:.3f} ({r['rows']} of {r['supervised']} positions); "
          f"before = {r['monitor_all_over_loss']:.3f}; fused mode = {r['fused_monitor_over_fused_loss']:.3f}")
    print(f"total {total_s:.1f} s; load average before {_fmt_load(load_before)}, after {_fmt_load(_loadavg())}")
    if not args.no_save:
        from abkd.results import save_record
        out = Path(args.out) if args.out else BENCH_DIR / "results" / f"monitor_{args.n}x{args.v}.json"
        config = {"n": args.n, "v": args.v, "hidden": args.hidden, "dtype": "float32", "alpha": args.alpha,
                  "beta": args.beta, "monitor_rows": args.monitor_rows, "repeats": args.repeats, "warmup": 1,
                  "threads": args.threads, "device": args.device, "torch": torch.__version__,
                  "inputs": "torch.randn student/teacher logits [1, N+1, V], random labels (all supervised), "
                            "hidden [1, N+1, H], head randn [V, H]/sqrt(H), one torch.Generator seeded with seed",
                  "calls": TIMED, "loadavg_before": load_before, "loadavg_after": _loadavg(), "total_s": total_s}
        save_record(out, experiment="bench_monitor", config=config, metrics=r, seed=args.seed,
                    notes="median wall time (time.perf_counter) of each call after one warm-up, one process, the same "
                          "inputs; ratios are of medians; see bench/README.md")
        print(f"saved {out}")
    return 0


def _loadavg():
    try: return list(os.getloadavg())
    except OSError: return None


def _fmt_load(x):
    return "n/a" if x is None else "/".join(f"{v:.2f}" for v in x)


if __name__ == "__main__":
    sys.exit(main())
