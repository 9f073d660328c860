"""GPU check of the LLM distillation trainer: a few KD steps of a GPT-2 XL-shape teacher -> GPT-2-base-shape student.

Run once on one CUDA card, from the repository root (sized to finish in a few minutes on an H100/H200):

    python bench/bench_llm_gpu.py                      # B = 8, S = 512, 12 steps per loss, bf16; saves the record
    python bench/bench_llm_gpu.py --dry-run --no-save  # the same code on the CPU with tiny GPT-2s (~20 s on 2 cores)

What runs: `abkd.llm.train.fit_llm` (mode "kd", one epoch of `steps` micro-batches of B random sequences of S tokens,
the first half of each sequence masked as a prompt) through an `accelerate.Accelerator(mixed_precision="bf16")`,
the teacher frozen in bf16, AdamW on the student, twice:

* `abkd`: the trainer's own loss, `abkd.losses.get_loss("ab", alpha=0.2, beta=0.7, reduction="sum")`
  (on CUDA the Triton kernel, `impl="auto"`);
* `plain_log_space`: the same trainer given (`kd_loss=`) plain autograd through the log-space general
  formula of D_AB (`bench/official_style.ab_divergence_log_general`, float32 upcast), summed over supervised tokens.

Both models are randomly initialised GPT-2s (teacher 48 layers x 1600, student 12 x 768, vocabulary 50257): the
arithmetic is that of the real run, the losses are meaningless. Timing: `time.perf_counter` after
`torch.cuda.synchronize` at the start of every training step (a forward pre-hook on the student) and at the first
evaluation forward (end of training); tokens/s counts all B x S tokens of the steps after the first `--warmup` ones.
Peak memory: `torch.cuda.max_memory_allocated` over the `fit_llm` call, models already on the card. The record goes
through `abkd.results.save_record` (experiment `bench_llm_gpu`) to bench/results/llm_gpu_<card>.json unless --no-save.
"""
from __future__ import annotations

import argparse, platform, sys, tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for p in (str(REPO_ROOT), str(BENCH_DIR)):
    if p not in sys.path: sys.path.insert(0, p)        # run from a checkout without installing

import torch
from torch import nn

from bench_cifar_gpu import StepClock, pick_device, slug   # shared with the CIFAR check
from official_style import ab_divergence_log_general

ALPHA, BETA = 0.2, 0.7
PAPER = dict(teacher=dict(n_layer=48, n_embd=1600, n_head=25), student=dict(n_layer=12, n_embd=768, n_head=12),
             vocab=50257, batch=8, seq=512, steps=12, warmup=2)
DRY = dict(teacher=dict(n_layer=2, n_embd=64, n_head=2), student=dict(n_layer=1, n_embd=32, n_head=2),
           vocab=1000, batch=2, seq=64, steps=3, warmup=1)


class PlainLogSpace(nn.Module):
    "Σ over supervised tokens of D_AB by plain autograd through the log-space general formula (float32)."
    def forward(self, student_logits, teacher_logits, mask=None):
        rows = ab_divergence_log_general(student_logits.float(), teacher_logits.float(), ALPHA, BETA)
        return rows[mask].sum() if mask is not None else rows.sum()


def random_sequences(n: int, seq: int, vocab: int, generator: torch.Generator) -> list[dict]:
    "n random token sequences; the first half of each is a prompt (labels -100)."
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=generator).tolist()
        out.append(dict(input_ids=ids, labels=[-100] * (seq // 2) + ids[seq // 2:]))
    return out


def gpt2(shape: dict, vocab: int, seq: int, device, dtype=None):
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device(device):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=max(seq, 1024), bos_token_id=vocab - 1,
                                           eos_token_id=vocab - 1, **shape))
    return model.to(dtype) if dtype is not None else model


def run_one(name: str, sizes: dict, device, seed: int) -> dict:
    "fit_llm for `steps` KD micro-batches with the loss `name`; speed and memory."
    import abkd.llm.train as T
    from accelerate import Accelerator
    from abkd.llm.data import collate
    cuda = device.type == "cuda"
    accelerator = Accelerator(mixed_precision="bf16") if cuda else Accelerator(cpu=True)
    cfg = T.LLMTrainConfig(mode="kd", loss="ab", loss_params=dict(alpha=ALPHA, beta=BETA), epochs=1,
                           micro_batch_size=sizes["batch"], lr=5e-4, seed=seed, monitor_every=0)
    torch.manual_seed(seed)
    teacher = gpt2(sizes["teacher"], sizes["vocab"], sizes["seq"], device, torch.bfloat16 if cuda else None).eval()
    student = gpt2(sizes["student"], sizes["vocab"], sizes["seq"], device)
    g = torch.Generator().manual_seed(seed)
    train = random_sequences(sizes["batch"] * sizes["steps"], sizes["seq"], sizes["vocab"], g)
    valid = random_sequences(sizes["batch"], sizes["seq"], sizes["vocab"], g)
    kd_loss = PlainLogSpace() if name == "plain_log_space" else None      # None: the trainer's own loss
    clock = StepClock(device)
    hook = student.register_forward_pre_hook(clock)
    if cuda: torch.cuda.synchronize(device); torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    try:
        with tempfile.TemporaryDirectory(prefix="bench_llm_gpu_") as out:
            t0 = clock.now()
            res = T.fit_llm(cfg, student, train, valid, lambda b: collate(b, pad_id=0), out, teacher=teacher,
                            accelerator=accelerator, resume=False, progress=False, kd_loss=kd_loss)
    finally:
        hook.remove()
    w, steps = sizes["warmup"], sizes["steps"]
    if len(clock.starts) != steps or clock.train_end is None:
        raise RuntimeError(f"recorded {len(clock.starts)} training steps (expected {steps})")
    steady_s = clock.train_end - clock.starts[w]
    tokens = (steps - w) * sizes["batch"] * sizes["seq"]
    out = dict(tokens_per_s=tokens / steady_s, step_ms=steady_s / (steps - w) * 1e3,
               first_steps_s=clock.starts[w] - t0, train_loss=res["history"][-1]["train_loss"])
    if cuda:
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30, models_gib=before,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    del teacher, student
    if cuda: torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny GPT-2s on the CPU (a check of the script)")
    ap.add_argument("--steps", type=int, default=None, help="KD micro-batches per loss (default 12; 3 dry)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON record path (default bench/results/llm_gpu_<card>.json)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no JSON record")
    args = ap.parse_args(argv)
    sizes = dict(DRY if args.dry_run else PAPER)
    if args.steps is not None:
        if args.steps <= sizes["warmup"]: ap.error(f"--steps must exceed the {sizes['warmup']} warm-up steps")
        sizes["steps"] = args.steps
    picked = pick_device(args.dry_run)
    if picked is None: return 2
    device, card = picked
    import abkd
    print(f"card: {card}  torch {torch.__version__} (CUDA {torch.version.cuda})  abkd {abkd.__version__}  "
          f"python {platform.python_version()}")
    print(f"teacher GPT-2 {sizes['teacher']} -> student {sizes['student']}, vocab {sizes['vocab']}, B {sizes['batch']}, "
          f"S {sizes['seq']}, {sizes['steps']} steps ({sizes['warmup']} warm-up), AB({ALPHA}, {BETA}), "
          f"{'bf16 autocast, teacher bf16' if device.type == 'cuda' else 'float32'}", flush=True)
    results = {name: run_one(name, sizes, device, args.seed) for name in ("abkd", "plain_log_space")}
    print(f"\n== results: {card} ==")
    for name, r in results.items():
        mem = "" if "peak_allocated_gib" not in r else f", peak {r['peak_allocated_gib']:.2f} GiB (models {r['models_gib']:.2f})"
        print(f"{name:16s} {r['tokens_per_s']:>12,.0f} tokens/s  {r['step_ms']:9.1f} ms/step{mem}")
    a, p = results["abkd"], results["plain_log_space"]
    print(f"ratio abkd / plain: tokens/s {a['tokens_per_s'] / p['tokens_per_s']:.2f}x"
          + (f", peak memory {a['peak_allocated_gib'] / p['peak_allocated_gib']:.2f}x" if "peak_allocated_gib" in a else ""))
    if not args.no_save:
        from abkd.results import save_record
        out = Path(args.out) if args.out else BENCH_DIR / "results" / (
            "llm_gpu_dry-run-cpu.json" if args.dry_run else f"llm_gpu_{slug(card)}.json")
        save_record(out, experiment="bench_llm_gpu", config=dict(card=card, sizes=sizes, alpha=ALPHA, beta=BETA,
                    torch=torch.__version__, cuda=torch.version.cuda, abkd=abkd.__version__),
                    metrics=results, seed=args.seed, notes="KD steps through abkd.llm.train.fit_llm on random data "
                    "and random GPT-2 weights; see the script's docstring")
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
