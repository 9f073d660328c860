"""Tests of `abkd.clip.train`: the PromptKD objective, the schedule and config errors, exact resume, KD that reads no labels, the teacher stage."""
import math
import pytest
import torch
from abkd.clip.data import STANDIN_WORDS, Datum, base_new_splits, write_standin_dataset
from abkd.clip.models import PromptConfig, PromptedCLIP, PromptKDStudent, load_clip, tiny_clip_config, word_tokenizer
from abkd.clip.train import CLIPTrainConfig, epoch_lr, fit_clip, kd_objective, learned_state, make_objective


TOK_WORDS = ["a", "photo", "of"] + STANDIN_WORDS


def test_objective_is_promptkd_loss_for_kd():
    s, t = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)
    cfg = CLIPTrainConfig(method="kd", loss_params=dict(temperature=1.0), kd_weight=1000.0)
    p_t = torch.softmax(t, 1)
    ref = 1000.0 * (p_t * (torch.log(p_t) - torch.log_softmax(s, 1))).sum() / s.numel()
    torch.testing.assert_close(kd_objective(cfg, make_objective(cfg), s, t, 0.0).double(), ref, rtol=1e-6, atol=0)


# The official base-to-new objective of every method, written out in float64 (p: teacher, q: student; B rows, C classes).
def _ab(p, q, a, b):
    "Per-row D_AB^(α,β)(p‖q) = Σ p^(α+β)/(β(α+β)) + q^(α+β)/(α(α+β)) − p^α q^β/(αβ) (ABKL's three sums)."
    return ((p ** (a + b)).sum(1) / (b * (a + b)) + (q ** (a + b)).sum(1) / (a * (a + b))
            - (p ** a * q ** b).sum(1) / (a * b))

def _kl_rows(p, q): return (p * (p.log() - q.log())).sum(1)

def _zscore(z): return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)

def _dkd_rows(s, t, y, T, a, b, tckd_kl=True):
    "TCKD on [p_y, 1 − p_y] and NCKD on the renormalised non-target classes, each T²·per-row, per row."
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    onehot = torch.nn.functional.one_hot(y, s.shape[1]).bool()
    bs = torch.stack([ps[onehot], 1 - ps[onehot]], 1); bt = torch.stack([pt[onehot], 1 - pt[onehot]], 1)
    ns = torch.softmax((s / T).masked_fill(onehot, -1e300), 1)[~onehot].view(len(s), -1)
    nt = torch.softmax((t / T).masked_fill(onehot, -1e300), 1)[~onehot].view(len(s), -1)
    tckd = _kl_rows(bt, bs) if tckd_kl else _ab(bt, bs, a, b)
    nckd = _kl_rows(nt, ns) if (a, b) == (1.0, 0.0) else _ab(nt, ns, a, b)
    return T * T * tckd, T * T * nckd

def _ttm_target(t, g):
    pg = torch.softmax(t, 1) ** g
    return pg / pg.sum(1, keepdim=True), pg.sum(1)

def official_objective(method, s, t, y, w, T=1.0, a=0.8, b=0.2, g=0.1, tw=1.0, nw=1.0):
    "w × the official base-to-new loss of `method` (kd, ls: sum/(B·C)·T²; ab, dkd, ttm: batch means; ab: no T²)."
    B, C = s.shape
    sm = lambda z: torch.softmax(z / T, 1)
    if method == "kd": return w * T * T * _kl_rows(sm(t), sm(s)).sum() / (B * C)
    if method == "lsd": return w * T * T * _kl_rows(sm(_zscore(t)), sm(_zscore(s))).sum() / (B * C)
    if method == "ablsd": return w * T * T * _ab(sm(_zscore(t)), sm(_zscore(s)), a, b).sum() / (B * C)
    if method == "abkd": return w * _ab(sm(t), sm(s), a, b).mean()
    if method == "dkd":
        tc, nc = _dkd_rows(s, t, y, T, 1.0, 0.0); return w * (tw * tc + nw * nc).mean()
    if method == "abdkd":
        tc, nc = _dkd_rows(s, t, y, T, a, b, tckd_kl=True); return w * (tw * tc + nw * nc).mean()
    q = torch.softmax(s, 1)
    target, mass = _ttm_target(t, g)
    if method == "ttm": return w * _kl_rows(target, q).mean()
    if method == "abttm": return w * _ab(target, q, a, b).mean()
    if method == "wttm": return w * (mass * _kl_rows(target, q)).mean()
    raise KeyError(method)

SCALING_CASES = {
    "kd": dict(temperature=2.0), "lsd": dict(temperature=2.0), "ablsd": dict(alpha=0.8, beta=0.2, temperature=2.0),
    "abkd": dict(alpha=0.8, beta=0.2, temperature=2.0),
    "dkd": dict(temperature=2.0, tckd_weight=1.0, nckd_weight=0.5, warmup=0.0),
    "abdkd": dict(alpha=0.8, beta=0.2, temperature=2.0, tckd_weight=1.0, nckd_weight=0.5, warmup=0.0, ab_tckd=False),
    "ttm": dict(gamma=0.1), "abttm": dict(alpha=0.8, beta=0.2, gamma=0.1), "wttm": dict(gamma=0.2),
}


@pytest.mark.parametrize("method", sorted(SCALING_CASES))
def test_each_method_scaled_as_the_official_code(method):
    "Every method's objective equals w × its official base-to-new loss (float64 formula), with T ≠ 1 where it has one."
    from abkd.clip.train import KD_SCALING
    from abkd.vision_losses import VISION_LOSSES
    assert set(SCALING_CASES) == set(VISION_LOSSES) == set(KD_SCALING)
    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(6, 11, dtype=torch.float64, generator=g), 3 * torch.randn(6, 11, dtype=torch.float64, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    params = SCALING_CASES[method]
    cfg = CLIPTrainConfig(method=method, loss_params=params, kd_weight=300.0, labels="ground_truth")
    kw = dict(T=params.get("temperature", 1.0), a=params.get("alpha", 1.0), b=params.get("beta", 0.0),
              g=params.get("gamma", 0.1), tw=params.get("tckd_weight", 1.0), nw=params.get("nckd_weight", 1.0))
    ref = official_objective(method, s, t, y, 300.0, **kw)
    torch.testing.assert_close(kd_objective(cfg, make_objective(cfg), s, t, 5.0, y).double(), ref, rtol=1e-5, atol=0)


def test_ab_is_c_times_stronger_than_kd_at_the_same_weight():
    "At α → KL the official AB is a batch mean, KD a mean over B·C: the same w gives AB C times KD's objective."
    s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    kd = CLIPTrainConfig(method="kd", loss_params=dict(temperature=1.0), kd_weight=1000.0)
    ab = CLIPTrainConfig(method="abkd", loss_params=dict(alpha=1.0, beta=1e-9, temperature=1.0), kd_weight=1000.0)
    ratio = kd_objective(ab, make_objective(ab), s, t, 0.0) / kd_objective(kd, make_objective(kd), s, t, 0.0)
    assert float(ratio) == pytest.approx(50.0, rel=1e-6)


def test_target_labels_teacher_or_ground_truth():
    "DKD's target: the teacher's argmax by default; the passed labels with labels='ground_truth', which need labels."
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    y = (t.argmax(1) + 1) % 7
    params = dict(temperature=1.0, tckd_weight=1.0, nckd_weight=1.0, warmup=0.0)
    teacher = CLIPTrainConfig(method="dkd", loss_params=params, kd_weight=1.0)
    truth = CLIPTrainConfig(method="dkd", loss_params=params, kd_weight=1.0, labels="ground_truth")
    torch.testing.assert_close(kd_objective(teacher, make_objective(teacher), s, t, 0.0, y).double(),
                               official_objective("dkd", s, t, t.argmax(1), 1.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(kd_objective(truth, make_objective(truth), s, t, 0.0, y).double(),
                               official_objective("dkd", s, t, y, 1.0), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="no labels were passed"):
        kd_objective(truth, make_objective(truth), s, t, 0.0)
    with pytest.raises(ValueError, match="labels must be one of 'teacher', 'ground_truth'"):
        CLIPTrainConfig(labels="gt")


def test_schedule_and_config_errors():
    cfg = CLIPTrainConfig(epochs=20)
    # Dassl (WARMUP_RECOUNT): warm-up at 1e-5, then the full rate, the cosine counted from the warm-up's end
    assert epoch_lr(cfg, 0) == 1e-5 and epoch_lr(cfg, 1) == 0.005
    assert epoch_lr(cfg, 19) == pytest.approx(0.5 * 0.005 * (1 + math.cos(math.pi * 18 / 20)), rel=1e-14)
    assert epoch_lr(CLIPTrainConfig(epochs=10, warmup_epochs=0), 0) == 0.005
    # float32 as the official config (PREC fp32); bf16 autocast only when asked
    assert CLIPTrainConfig().amp is False and CLIPTrainConfig(amp=True).amp is True
    assert CLIPTrainConfig(method="abkd", loss_params=dict(alpha=1.0, beta=0.0), recipe_name="fkl_at_abkd_weights").name \
        == "fkl_at_abkd_weights" and CLIPTrainConfig().name == "kd"
    with pytest.raises(ValueError, match="recipe_name must be None or a name"):
        CLIPTrainConfig(recipe_name="a/b")
    with pytest.raises(ValueError, match="warmup_epochs"):
        CLIPTrainConfig(epochs=1, warmup_epochs=1)
    with pytest.raises(ValueError, match="stage"):
        CLIPTrainConfig(stage="sft")
    # every field is checked when the configuration is written, the loss's parameters included
    for kw, exc, match in ((dict(method="abkd", loss_params=dict(alpha=0.8)), ValueError, "needs beta"),
                           (dict(loss_params=dict(temperature=-1.0)), ValueError, "temperature must be > 0"),
                           (dict(lr=float("nan")), ValueError, "lr must be finite"),
                           (dict(lr="0.005"), TypeError, "lr must be a real number"),
                           (dict(kd_weight=-1.0), ValueError, r"kd_weight must be in \[0, inf\]"),
                           (dict(warmup_epochs=0.5), TypeError, "warmup_epochs must be an int"),
                           (dict(num_workers=-1), ValueError, "num_workers must be an int >= 0"),
                           (dict(amp="no"), TypeError, "amp must be True or False")):
        with pytest.raises(exc, match=match):
            CLIPTrainConfig(**kw)
    assert CLIPTrainConfig(stage="teacher", method="not-a-loss").stage == "teacher"   # the teacher stage has no KD loss


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_run")
    write_standin_dataset(root, "eurosat", n_classes=4, n_train=4, n_val=1, n_test=3, image_size=32)
    splits = base_new_splits(root, "eurosat", num_shots=2)
    tok = word_tokenizer(TOK_WORDS)
    pc = PromptConfig(depth_text=2, depth_vision=2)
    torch.manual_seed(0)
    teacher = PromptedCLIP(load_clip(tiny_clip_config(width=48, projection_dim=48)), tok, splits.classnames, pc)
    torch.manual_seed(1)
    student_clip = load_clip(tiny_clip_config())
    make = lambda: PromptKDStudent(PromptedCLIP(student_clip, tok, splits.classnames, pc), teacher_dim=48)
    return root, splits, teacher, make


def test_resume_equals_uninterrupted(run_setup, tmp_path):
    _, splits, teacher, make = run_setup
    cfg = CLIPTrainConfig(dataset="eurosat", method="abdkd", loss_params=dict(alpha=0.8, beta=0.2, temperature=1.0,
                          warmup=1.0), epochs=3, image_size=32, batch_size=4)
    torch.manual_seed(5); a = make()
    full = fit_clip(cfg, a, splits, tmp_path / "full", teacher=teacher, progress=False)
    torch.manual_seed(5); b = make()
    part = fit_clip(cfg, b, splits, tmp_path / "resumed", teacher=teacher, progress=False, stop_after=1)
    assert not part["finished"] and "metrics" not in part
    c = make()
    with torch.no_grad():
        for p in c.parameters():
            if p.requires_grad: p.normal_()
    done = fit_clip(cfg, c, splits, tmp_path / "resumed", teacher=teacher, progress=False)
    for k, v in learned_state(a).items():
        assert torch.equal(v, learned_state(c)[k]), k
    assert done["metrics"] == full["metrics"] and done["history"] == full["history"]
    assert "prompted.clip.vision_model.embeddings.patch_embedding.weight" not in learned_state(a)


def test_training_reads_no_labels_in_kd(run_setup, tmp_path):
    "KD never reads the training labels: shuffling them leaves the run unchanged."
    import dataclasses, random
    _, splits, teacher, make = run_setup
    cfg = CLIPTrainConfig(dataset="eurosat", method="dkd", loss_params=dict(temperature=1.0, warmup=1.0), epochs=2,
                          image_size=32)
    torch.manual_seed(3); a = make()
    ra = fit_clip(cfg, a, splits, tmp_path / "a", teacher=teacher, progress=False)
    labels = [d.label for d in splits.train_all]; random.Random(0).shuffle(labels)
    shuffled = dataclasses.replace(splits, train_all=[Datum(d.impath, y, d.classname)
                                                      for d, y in zip(splits.train_all, labels)])
    torch.manual_seed(3); b = make()
    rb = fit_clip(cfg, b, shuffled, tmp_path / "b", teacher=teacher, progress=False)
    assert ra["history"] == rb["history"]


def test_teacher_stage_learns_base_classes(run_setup, tmp_path):
    _, splits, teacher, _ = run_setup
    import copy
    t = copy.deepcopy(teacher)
    cfg = CLIPTrainConfig(dataset="eurosat", stage="teacher", epochs=6, lr=0.05, image_size=32, batch_size=4)
    res = fit_clip(cfg, t, splits, tmp_path / "t", progress=False)
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    assert set(res["metrics"]) == {"base", "new", "hm", "val_base"}   # val_base: the split λ is chosen on


def test_kd_without_teacher_and_mismatched_dataset(run_setup, tmp_path):
    _, splits, teacher, make = run_setup
    with pytest.raises(ValueError, match="needs the teacher"):
        fit_clip(CLIPTrainConfig(dataset="eurosat", image_size=32), make(), splits, tmp_path)
    with pytest.raises(ValueError, match="splits are 'eurosat'"):
        fit_clip(CLIPTrainConfig(dataset="dtd", image_size=32), make(), splits, tmp_path, teacher=teacher)

