"CLIP base-to-new: splits, metrics, prompt learners, loaders on stand-in folders, the trainer's resume, a short smoke run."
import json, math
from pathlib import Path

import pytest
import torch

from abkd.clip.data import (DATASETS, STANDIN_WORDS, Datum, DatasetNotFoundError, ImageList, base_new_labels,
                            base_new_splits, clip_transform, fewshot, read_dataset, subsample_classes,
                            write_standin_dataset)
from abkd.clip.metrics import accuracy, harmonic_mean
from abkd.clip.models import (FeatureProjection, PromptConfig, PromptedCLIP, PromptKDStudent, TeacherPromptsNotFoundError,
                              class_prompts, encode_image, encode_text, load_clip, load_teacher_prompts,
                              teacher_prompt_path, tiny_clip_config, trainable_parameters, word_tokenizer)
from abkd.clip.train import CLIPTrainConfig, epoch_lr, fit_clip, kd_objective, learned_state, make_objective

TOK_WORDS = ["a", "photo", "of"] + STANDIN_WORDS


# ---------------------------------------------------------------- splits and metrics

@pytest.mark.parametrize("n, base", [(1, [0]), (2, [0]), (5, [0, 1, 2]), (10, [0, 1, 2, 3, 4]), (101, list(range(51)))])
def test_base_new_halves(n, base):
    b, nw = base_new_labels(list(range(n)) * 2)
    assert b == base and nw == list(range(len(base), n))
    assert len(b) == math.ceil(n / 2)


def test_subsample_relabels_in_order_and_uses_training_labels():
    items = [Datum(f"{i}", y, f"c{y}") for i, y in enumerate([4, 0, 2, 6, 4, 8])]
    new = subsample_classes(items, "new")                  # labels {0,2,4,6,8}: base 0,2,4; new 6,8
    assert [(d.label, d.classname) for d in new] == [(0, "c6"), (1, "c8")]
    # test split lacking a class: the halves follow the training labels passed in
    test = [Datum("t", 6, "c6")]
    assert subsample_classes(test, "base", labels=[0, 2, 4, 6, 8]) == []
    assert subsample_classes(test, "new", labels=[0, 2, 4, 6, 8])[0].label == 0


def test_fewshot_is_seeded_and_per_label():
    items = [Datum(str(i), i % 3, f"c{i % 3}") for i in range(30)]
    a, b = fewshot(items, 4, seed=3), fewshot(items, 4, seed=3)
    assert a == b and len(a) == 12 and all(sum(d.label == y for d in a) == 4 for y in range(3))
    assert fewshot(items, 4, seed=4) != a
    assert fewshot(items, 0, seed=1) == items


@pytest.mark.parametrize("b, n, hm", [(90, 50, 2 * 90 * 50 / 140), (0, 80, 0.0), (100, 100, 100.0), (0, 0, 0.0)])
def test_harmonic_mean(b, n, hm):
    assert harmonic_mean(b, n) == pytest.approx(hm, rel=1e-15)
    assert harmonic_mean(b, n) <= (b + n) / 2 + 1e-12


@pytest.mark.parametrize("bad", [-1, 100.5, float("inf"), float("nan"), "90", True])
def test_harmonic_mean_rejects_bad_accuracies(bad):
    with pytest.raises(ValueError, match="base"):
        harmonic_mean(bad, 50)


def test_accuracy():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 0])) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no examples"):
        accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------- loaders on stand-in folders

@pytest.mark.parametrize("name", list(DATASETS))
def test_every_reader_on_its_standin(tmp_path, name):
    write_standin_dataset(tmp_path, name, n_classes=5, n_train=3, n_val=1, n_test=2, image_size=16, seed=1)
    splits = read_dataset(tmp_path, name)
    assert len(splits["train"]) == 15 and len(splits["test"]) == 10
    assert {d.classname for d in splits["train"]} == set(STANDIN_WORDS[:5])
    s = base_new_splits(tmp_path, name, num_shots=2)
    assert s.classnames == STANDIN_WORDS[:5] and s.n_base == 3
    assert len(s.train_base) == 6 and {d.label for d in s.test_new} == {0, 1}
    x, y = ImageList(s.test_new, clip_transform(16))[0]
    assert x.shape == (3, 16, 16) and y == 0


def test_zhou_split_file_format(tmp_path):
    write_standin_dataset(tmp_path, "oxford_pets", n_classes=2, n_train=1, n_val=1, n_test=1, image_size=8)
    raw = json.loads((tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    assert set(raw) == {"train", "val", "test"}
    impath, label, cname = raw["train"][0]
    assert isinstance(impath, str) and isinstance(label, int) and cname == STANDIN_WORDS[0]
    assert (tmp_path / "oxford_pets" / "images" / impath).is_file()


def test_missing_split_file_names_it(tmp_path):
    write_standin_dataset(tmp_path, "ucf101", n_classes=2, n_train=1, n_val=1, n_test=1, image_size=8)
    (tmp_path / "ucf101" / "split_zhou_UCF101.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="split file .*split_zhou_UCF101.json"):
        read_dataset(tmp_path, "ucf101")
    with pytest.raises(DatasetNotFoundError, match="dataset folder"):
        read_dataset(tmp_path, "sun397")


def test_corrupt_split_and_image(tmp_path):
    write_standin_dataset(tmp_path, "dtd", n_classes=2, n_train=2, n_val=1, n_test=1, image_size=8)
    split = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_dataset(tmp_path, "dtd")
    write_standin_dataset(tmp_path, "dtd", n_classes=2, n_train=2, n_val=1, n_test=1, image_size=8)
    item = read_dataset(tmp_path, "dtd")["train"][0]
    Path(item.impath).write_bytes(b"not an image")
    with pytest.raises(ValueError, match="corrupt"):
        ImageList([item], clip_transform(8))[0]


def test_standin_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    import abkd.clip.data as D
    calls = {"n": 0}
    real = D._standin_image
    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3: raise RuntimeError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(D, "_standin_image", failing)
    with pytest.raises(RuntimeError):
        write_standin_dataset(tmp_path, "food101", n_classes=2, n_train=2, image_size=8)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = word_tokenizer(TOK_WORDS)
    names = STANDIN_WORDS[:6]
    pc = PromptConfig(depth_text=2, depth_vision=3)
    teacher = PromptedCLIP(load_clip(tiny_clip_config(width=48, projection_dim=48)), tok, names, pc)
    student = PromptKDStudent(PromptedCLIP(load_clip(tiny_clip_config()), tok, names, pc), teacher_dim=48)
    return tok, names, pc, teacher, student


def test_prompt_learner_shapes_and_counts(tiny):
    _, names, pc, teacher, student = tiny
    assert teacher.text_ctx.shape == (2, 4, 48) and teacher.vision_ctx.shape == (3, 4, 48)
    got = {n: p.numel() for n, p in trainable_parameters(student)}
    assert got == {"prompted.vision_ctx": 3 * 4 * 32, "projection.0.weight": 32 * 48, "projection.0.bias": 48,
                   "projection.1.weight": 48, "projection.1.bias": 48, "projection.3.weight": 48 * 48,
                   "projection.3.bias": 48}
    assert not any(p.requires_grad for p in student.prompted.clip.parameters())
    assert not student.prompted.text_ctx.requires_grad
    g = teacher.text_features()
    assert g.shape == (6, 48) and torch.allclose(g.norm(dim=-1), torch.ones(6))
    assert student(torch.randn(3, 3, 32, 32), g).shape == (3, 6)


def test_paper_size_counts_from_configs():
    "Prompt and projection sizes of ViT-B/16 and ViT-L/14 built from their published widths (random weights)."
    from abkd.clip.models import projection_parameter_count, prompt_parameter_count
    assert prompt_parameter_count(PromptConfig(), 512, 768)["vision"] == 27648
    assert projection_parameter_count(512, 768) == sum(p.numel() for p in FeatureProjection(512, 768).parameters())


def test_encoders_without_prompts_match_transformers(tiny):
    tok, names, _, teacher, _ = tiny
    clip = teacher.clip
    pr = class_prompts(tok, names, n_ctx=0, ctx_init="")
    mask = (torch.arange(pr.input_ids.shape[1]) <= pr.eot_positions[:, None]).long()
    pooled = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output   # transformers 4.x / 5
    ref = pooled(clip.get_text_features(input_ids=pr.input_ids, attention_mask=mask))
    torch.testing.assert_close(encode_text(clip, pr), ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encode_image(clip, x), pooled(clip.get_image_features(pixel_values=x)),
                               rtol=1e-5, atol=1e-5)


def test_deep_prompts_change_every_prompted_layer(tiny):
    "Perturbing the prompt of any prompted layer (here the last of both branches) changes the features."
    _, _, _, teacher, _ = tiny
    x = torch.randn(2, 3, 32, 32)
    noise = torch.randn(4, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f0, g0 = teacher.image_features(x).clone(), teacher.text_features().clone()
        for ctx, layer in ((teacher.vision_ctx, 2), (teacher.text_ctx, 1)):
            ctx[layer] += noise
        f1, g1 = teacher.image_features(x).clone(), teacher.text_features().clone()
        for ctx, layer in ((teacher.vision_ctx, 2), (teacher.text_ctx, 1)):
            ctx[layer] -= noise
    assert (f0 - f1).abs().max() > 1e-3 and (g0 - g1).abs().max() > 1e-3


def test_student_rejects_student_text_features(tiny):
    _, _, _, _, student = tiny
    with pytest.raises(ValueError, match="teacher's text features"):
        student(torch.randn(1, 3, 32, 32), torch.randn(6, 32))


def test_teacher_prompt_registry(tmp_path, tiny):
    _, _, pc, teacher, _ = tiny
    with pytest.raises(TeacherPromptsNotFoundError, match="train them with"):
        teacher_prompt_path(tmp_path, "EuroSAT")
    sd = {"prompt_learner.ctx": torch.randn(4, 48), "image_encoder.VPT": torch.randn(4, 48)}
    sd.update({f"text_encoder.transformer.resblocks.{l}.VPT_shallow": torch.randn(4, 48) for l in (1,)})
    sd.update({f"image_encoder.transformer.resblocks.{l}.VPT_shallow": torch.randn(4, 48) for l in (1, 2)})
    path = tmp_path / "EuroSAT" / "VLPromptLearner" / "model-best.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": sd}, path)
    load_teacher_prompts(teacher, teacher_prompt_path(tmp_path, "EuroSAT"))
    assert torch.equal(teacher.vision_ctx[2], sd["image_encoder.transformer.resblocks.2.VPT_shallow"])
    torch.save({"state_dict": dict(sd, **{"prompt_learner.ctx": torch.randn(4, 48)})}, path)   # the file changed
    with pytest.raises(ValueError, match="sha256"):
        teacher_prompt_path(tmp_path, "EuroSAT")
    del sd["image_encoder.VPT"]
    torch.save({"state_dict": sd}, tmp_path / "x.pt")
    with pytest.raises(KeyError, match="image_encoder.VPT"):
        load_teacher_prompts(teacher, tmp_path / "x.pt")


# ---------------------------------------------------------------- training

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


def test_short_smoke_run(tmp_path):
    from abkd.clip.experiment import SMOKE, reproduce_smoke
    from abkd.results import load_records
    quick = dict(SMOKE, datasets=("caltech101",), n_classes=4, n_train=3, n_test=2, shots=2, pretrain_epochs=1,
                 teacher_epochs=2, epochs=2, methods=("kd", "abkd"), seeds=(1,))
    written = reproduce_smoke(tmp_path, quick, progress=False)
    recs = load_records(tmp_path / "clip" / "records")
    assert len(recs) == 2 and {r["config"]["method"] for r in recs} == {"kd", "abkd"}
    assert all(set(r["metrics"]) >= {"base", "new", "hm", "teacher_hm"} for r in recs)
    table = written[-1].read_text()
    assert "| Caltech101 | ABKD (n=1) |" in table and "published PromptKD" in table
    assert "98.91" in table and "paper value not recorded" in table


def test_paper_path_with_released_teacher_prompts(tmp_path):
    "reproduce_paper end to end on a stand-in, with the teacher's prompts read from a file in PromptKD's release layout."
    from abkd.clip.experiment import reproduce_paper
    from abkd.results import load_records
    write_standin_dataset(tmp_path / "data", "dtd", n_classes=4, n_train=3, n_val=1, n_test=2, image_size=32)
    tok, pc = word_tokenizer(TOK_WORDS), PromptConfig(depth_text=2, depth_vision=2)
    def models(classnames):
        torch.manual_seed(0)
        teacher = PromptedCLIP(load_clip(tiny_clip_config(width=48, projection_dim=48)), tok, classnames, pc)
        student_clip = load_clip(tiny_clip_config())
        return teacher, lambda: PromptKDStudent(PromptedCLIP(student_clip, tok, classnames, pc), teacher_dim=48)
    sd = {"prompt_learner.ctx": torch.randn(4, 48), "image_encoder.VPT": torch.randn(4, 48),
          "text_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, 48),
          "image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, 48)}
    path = tmp_path / "teachers" / "DescribableTextures" / "VLPromptLearner" / "model-best.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": sd}, path)
    with pytest.raises(TeacherPromptsNotFoundError):
        reproduce_paper(tmp_path / "out", tmp_path / "data", tmp_path / "nowhere", datasets=("dtd",), methods=("kd",),
                        seeds=(1,), models=models, epochs=2, image_size=32, progress=False)
    written = reproduce_paper(tmp_path / "out", tmp_path / "data", tmp_path / "teachers", datasets=("dtd",),
                              methods=("abttm",), seeds=(1,), models=models, epochs=2, image_size=32, progress=False)
    recs = load_records(tmp_path / "out" / "clip" / "records")
    assert len(recs) == 1 and recs[0]["config"]["scale"] == "paper" and recs[0]["config"]["method"] == "abttm"
    assert "| DTD | ABTTM (n=1) |" in written[-1].read_text()
