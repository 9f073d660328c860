"""Tests of `abkd.clip.train`: the PromptKD objective, the schedule and config errors, exact resume, KD that reads no labels, the teacher stage."""
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


def test_schedule_and_config_errors():
    cfg = CLIPTrainConfig(epochs=20)
    assert epoch_lr(cfg, 0) == 1e-5 and epoch_lr(cfg, 20) == pytest.approx(0.0, abs=1e-18)
    assert max(epoch_lr(cfg, e) for e in range(20)) < 0.005
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
    assert set(res["metrics"]) == {"base", "new", "hm"}


def test_kd_without_teacher_and_mismatched_dataset(run_setup, tmp_path):
    _, splits, teacher, make = run_setup
    with pytest.raises(ValueError, match="needs the teacher"):
        fit_clip(CLIPTrainConfig(dataset="eurosat", image_size=32), make(), splits, tmp_path)
    with pytest.raises(ValueError, match="splits are 'eurosat'"):
        fit_clip(CLIPTrainConfig(dataset="dtd", image_size=32), make(), splits, tmp_path, teacher=teacher)

