"""GPU check of the CIFAR-100 training pipeline: one epoch of resnet32x4 → resnet8x4 with ABKD through the real trainer.

Run once on one CUDA card, from the repository root (sized to finish well under 5 minutes on an H100/H200):

    python bench/bench_cifar_gpu.py                    # 50,000 random images, 1 epoch, batch 64; saves the record
    python bench/bench_cifar_gpu.py --images 10000     # a smaller epoch
    python bench/bench_cifar_gpu.py --dry-run --no-save   # the same code on the CPU with 128 images (~15 s on 2 cores)

What runs: `abkd.cifar.train.fit` with the published ABKD recipe for resnet32x4 → resnet8x4
(`abkd.cifar.recipes.recipe`: batch 64, SGD lr 0.05, α=0.8, β=0.2, bf16 autocast on CUDA) cut to one epoch,
on random CIFAR-shaped data: a CPU `TensorDataset` of `torch.randn` images [N, 3, 32, 32] (already "normalized",
no augmentation) and labels uniform in 0..99, plus a random test set for the end-of-epoch evaluation. Both
networks are randomly initialized (no teacher checkpoint is loaded): the arithmetic is that of the real run,
the accuracies are meaningless. The teacher's linear head is scaled so that its logits on 256 of the images have
standard deviation 4, roughly the spread of a trained teacher's (a random resnet32x4 in eval mode gives about 16,
and the ABKD loss then starts near 200). The data stays on the CPU because the trainer's loader pins its batches
(`pin_memory=True` on CUDA), as for the real CIFAR-100, and copies each batch to the card.

What is timed (`time.perf_counter`; a forward pre-hook on the student records the start of every training step
after a `torch.cuda.synchronize`, which costs nothing extra because the trainer already synchronizes each step
through `loss.item()`):

* epoch: from the `fit()` call to the first evaluation forward (all training steps, the first ones included,
  data loading included; evaluation and checkpoint writing excluded); images/s = training images / that time;
* steady state: the same end minus the start of training step W + 1, W = `--warmup-batches` (default 50):
  the first W steps (cuDNN and allocator warm-up) left out; images/s = the images of steps W + 1.. / that time;
* eval + checkpoints: from the end of training to the return of `fit()` (test-set evaluation at batch 256,
  two checkpoint writes to a temporary directory).

Peak GPU memory is `torch.cuda.max_memory_allocated` over the whole `fit()` call (its peak statistics reset just
before, the models already on the card). The record goes through `abkd.results.save_record` (experiment
`bench_cifar_gpu`) to bench/results/cifar_gpu_<card>.json unless --no-save. See bench/README.md.
"""
from __future__ import annotations

import argparse, dataclasses, math, platform, re, sys, tempfile, time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path: sys.path.insert(0, str(REPO_ROOT))   # run from a checkout without installing

import torch

TEACHER, STUDENT, METHOD = "resnet32x4", "resnet8x4", "abkd"
IMAGES, TEST_IMAGES, WARMUP_BATCHES = 50_000, 10_000, 50
DRY_IMAGES, DRY_TEST_IMAGES, DRY_WARMUP_BATCHES = 128, 32, 1
SHAPE = (3, 32, 32)
TEACHER_LOGIT_STD = 4.0      # roughly a trained CIFAR-100 teacher's spread of logits (a random one gives ~16)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def random_cifar(n: int, num_classes: int, generator: torch.Generator) -> torch.utils.data.TensorDataset:
    "n standard-normal CIFAR-shaped float32 images and labels uniform in 0..num_classes-1, on the CPU."
    x = torch.randn(n, *SHAPE, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


@torch.no_grad()
def calibrate_head(model, probe: torch.Tensor, target_std: float = TEACHER_LOGIT_STD) -> float:
    "Scale the linear head of a randomly initialized `model` (eval mode) so its logits on `probe` have std `target_std`."
    model.eval()
    scale = target_std / float(model(probe).float().std())
    model.head.weight.mul_(scale); model.head.bias.mul_(scale)
    return scale


class StepClock:
    "Forward pre-hook on the student: the start time and batch size of every training step, and the end of training."

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.starts, self.sizes, self.train_end = [], [], None

    def now(self) -> float:
        if self.cuda: torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, module, args):
        if module.training:
            self.starts.append(self.now()); self.sizes.append(int(args[0].shape[0]))
        elif self.train_end is None and self.starts:       # the first evaluation forward: training is over
            self.train_end = self.now()


def pick_device(dry_run: bool):
    "(device, card name): the CPU for a dry run, else the current CUDA card; None (after a message) without one."
    if dry_run: return torch.device("cpu"), "cpu (dry run)"
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one GPU (use --dry-run for a CPU check of the script)", file=sys.stderr)
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    return device, torch.cuda.get_device_name(device)


def _fmt(x, spec: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help=f"run on the CPU with {DRY_IMAGES} training and {DRY_TEST_IMAGES} test images, "
                         f"{DRY_WARMUP_BATCHES} warm-up batch; GPU memory reads n/a")
    ap.add_argument("--images", type=int, default=None,
                    help=f"training images (default {IMAGES}; {DRY_IMAGES} with --dry-run)")
    ap.add_argument("--test-images", type=int, default=None,
                    help=f"test images for the end-of-epoch evaluation (default {TEST_IMAGES}; "
                         f"{DRY_TEST_IMAGES} with --dry-run)")
    ap.add_argument("--warmup-batches", type=int, default=None,
                    help=f"training steps left out of the steady-state rate (default {WARMUP_BATCHES}; "
                         f"{DRY_WARMUP_BATCHES} with --dry-run)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers passed to fit (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and the run (default 0)")
    ap.add_argument("--out", default=None, help="JSON record path (default bench/results/cifar_gpu_<card>.json)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no JSON record")
    args = ap.parse_args(argv)
    n_train = args.images if args.images is not None else (DRY_IMAGES if args.dry_run else IMAGES)
    n_test = args.test_images if args.test_images is not None else (DRY_TEST_IMAGES if args.dry_run else TEST_IMAGES)
    warmup = args.warmup_batches if args.warmup_batches is not None else (
        DRY_WARMUP_BATCHES if args.dry_run else WARMUP_BATCHES)
    if n_train < 1 or n_test < 1: ap.error("--images and --test-images must be positive")
    if warmup < 0: ap.error("--warmup-batches must be >= 0")
    if args.workers < 0: ap.error("--workers must be >= 0")

    picked = pick_device(args.dry_run)
    if picked is None: return 2
    device, card = picked
    cuda = device.type == "cuda"

    import abkd
    from abkd.cifar.models import count_parameters, create_model
    from abkd.cifar.recipes import recipe
    from abkd.cifar.train import fit

    cfg = recipe(TEACHER, STUDENT, METHOD, seed=args.seed)
    published_epochs = cfg.epochs
    cfg = dataclasses.replace(cfg, epochs=1)        # milestones (150, 180, 210) lie beyond: the lr stays at its start
    g = torch.Generator().manual_seed(args.seed)
    train, test = random_cifar(n_train, cfg.num_classes, g), random_cifar(n_test, cfg.num_classes, g)
    torch.manual_seed(args.seed)
    teacher = create_model(TEACHER, num_classes=cfg.num_classes)       # random weights: a speed check only
    head_scale = calibrate_head(teacher, train.tensors[0][:256])
    student = create_model(STUDENT, num_classes=cfg.num_classes)
    n_batches = math.ceil(n_train / cfg.batch_size)

    print(f"card: {card}  torch {torch.__version__} (CUDA {torch.version.cuda})  abkd {abkd.__version__}  "
          f"python {platform.python_version()}")
    print(f"{TEACHER} ({count_parameters(teacher) / 1e6:.2f} M, random init, head ×{head_scale:.3f}) -> {STUDENT} "
          f"({count_parameters(student) / 1e6:.2f} M) with {METHOD} {cfg.loss_params}, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, {'bf16 autocast' if cuda and cfg.amp else 'float32'}; 1 epoch of {n_train} random "
          f"{'x'.join(map(str, SHAPE))} images ({n_batches} steps), test {n_test}, {args.workers} loader workers",
          flush=True)

    # models on the card before timing, so fit's .to(device) is a no-op and CUDA is initialised
    teacher, student = teacher.to(device), student.to(device)
    clock = StepClock(device)
    hook = student.register_forward_pre_hook(clock)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    with tempfile.TemporaryDirectory(prefix="bench_cifar_gpu_") as out_dir:
        t0 = clock.now()
        result = fit(cfg, student, dict(train=train, test=test), out_dir, teacher=teacher, device=device,
                     num_workers=args.workers, resume=False, progress=False)
        t_end = clock.now()
    hook.remove()
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    reserved_gib = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None
    before_gib = allocated_before / 2**30 if cuda else None

    if len(clock.starts) != n_batches or clock.train_end is None:
        print(f"error: recorded {len(clock.starts)} training steps (expected {n_batches}) and "
              f"{'no' if clock.train_end is None else 'an'} end of training", file=sys.stderr)
        return 1
    epoch_s = clock.train_end - t0
    epoch_ips = n_train / epoch_s
    if warmup < n_batches:
        steady_s = clock.train_end - clock.starts[warmup]
        steady_images = sum(clock.sizes[warmup:])
        steady_ips, steady_step_ms = steady_images / steady_s, steady_s / (n_batches - warmup) * 1e3
    else:
        steady_s = steady_images = steady_ips = steady_step_ms = None
    warmup_s = (clock.starts[warmup] if warmup < n_batches else clock.train_end) - t0
    eval_s = t_end - clock.train_end
    hist = result["history"][-1]
    # what 240 epochs of 50,000 images would take at the steady rate plus this run's evaluation and checkpoints
    projected_h = (published_epochs * (50_000 / steady_ips + eval_s) / 3600) if steady_ips else None

    rows = [
        ("card", card),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("training images/s, whole epoch", f"{epoch_ips:,.0f}  ({n_train} images in {epoch_s:.2f} s, "
                                           f"{n_batches} steps, first steps and data loading included)"),
        ("training images/s, steady state", "n/a (fewer steps than --warmup-batches)" if steady_ips is None else
         f"{steady_ips:,.0f}  ({steady_images} images of steps {warmup + 1}..{n_batches} in {steady_s:.2f} s, "
         f"{steady_step_ms:.2f} ms/step)"),
        ("warm-up", f"{warmup_s:.2f} s (the fit() call to the start of step {min(warmup, n_batches) + 1}"
                    f"{'' if warmup < n_batches else ', i.e. the end of training'})"),
        ("eval + checkpoints", f"{eval_s:.2f} s ({n_test} test images at batch 256, two checkpoint writes)"),
        ("peak GPU memory allocated", "n/a" if peak_gib is None else
         f"{peak_gib:.2f} GiB (models {before_gib:.3f} GiB; peak reserved {reserved_gib:.2f} GiB)"),
        ("train loss / test acc", f"{hist['train_loss']:.3f} / {hist['test_acc']:.2f} % (random data and weights)"),
        (f"projected {published_epochs} epochs", "n/a" if projected_h is None else
         f"{projected_h:.2f} h at the steady rate + this eval, 50,000 images/epoch, no augmentation cost"),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"\n== results: {card} ==")
    for k, v in rows: print(f"{k.ljust(w)}  {v}")
    print(f"times: time.perf_counter{' after torch.cuda.synchronize' if cuda else ''}; whole epoch = fit() call to "
          f"the first evaluation forward; steady state = start of step {warmup + 1} to the same end")

    if not args.no_save:
        from abkd.results import save_record
        out = Path(args.out) if args.out else BENCH_DIR / "results" / (
            "cifar_gpu_dry-run-cpu.json" if args.dry_run else f"cifar_gpu_{slug(card)}.json")
        metrics = {"epoch_images_per_s": epoch_ips, "epoch_s": epoch_s, "warmup_s": warmup_s,
                   "eval_checkpoint_s": eval_s, "fit_s": t_end - t0, "train_images": n_train, "test_images": n_test,
                   "steps": n_batches, "warmup_batches": warmup, "train_loss": hist["train_loss"],
                   "test_acc": hist["test_acc"]}
        if steady_ips is not None:
            metrics.update(steady_images_per_s=steady_ips, steady_s=steady_s, steady_images=steady_images,
                           steady_step_ms=steady_step_ms, projected_published_epochs_h=projected_h)
        if cuda:
            metrics.update(peak_allocated_gib=peak_gib, peak_reserved_gib=reserved_gib, models_allocated_gib=before_gib)
        config = {"card": card, "device": str(device), "dry_run": args.dry_run, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "abkd": abkd.__version__, "teacher": TEACHER, "student": STUDENT,
                  "method": METHOD, "train_config": cfg.to_dict(), "published_epochs": published_epochs,
                  "workers": args.workers, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                  "data": "CPU TensorDataset: torch.randn images [N, 3, 32, 32] float32, labels uniform 0..99, "
                          "no augmentation; seeded with seed",
                  "weights": "teacher and student randomly initialized (no checkpoint): speed check only; the "
                             f"teacher's linear head scaled by {head_scale:.6g} so its logits on 256 training "
                             f"images have std {TEACHER_LOGIT_STD}",
                  "timing": "time.perf_counter after torch.cuda.synchronize at each training step's start (student "
                            "forward pre-hook); epoch = fit() call to the first evaluation forward; steady = start "
                            "of step warmup_batches+1 to the same end; eval_checkpoint = end of training to fit() "
                            "return",
                  "memory": "torch.cuda.max_memory_allocated over the fit() call, peak stats reset just before, "
                            "models already on the device"}
        save_record(out, experiment="bench_cifar_gpu", config=config, metrics=metrics, seed=args.seed,
                    notes="one epoch of the published ABKD recipe for resnet32x4 -> resnet8x4 through "
                          "abkd.cifar.train.fit on random data; see bench/README.md")
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
