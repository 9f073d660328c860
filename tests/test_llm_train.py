"""The LLM trainer: token normalisation under gradient accumulation (micro 8 × accum 4 = micro 32 × accum 1), the
official loss combination with an LM term on a pre-training corpus, AdamW's weight-decay groups, exact resume,
student-generated outputs, selection (or none without a validation set), the subsampled monitor with vocabulary
mapping, the fused loss, PEFT LoRA students and `load_trained`, max_steps with step-level evaluation and exact
mid-epoch resume, a user optimizer and scheduler, bf16/fp16 student mixed precision, gradient checkpointing, and bad
inputs — on tiny random GPT-2s and LLaMAs."""
import math
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from abkd.llm.train import (NO_DECAY, CorpusStream, LLMTrainConfig, ReplayBuffer, fit_llm, fused_micro_batch_loss,
                            load_trained, lm_micro_batch_loss, make_kd_loss, micro_batch_loss, monitor_rows,
                            monitor_stats, official_loss_weights, optimizer_param_groups, output_head, prompt_lengths,
                            update_gen_prob)
from abkd.llm import train as T
from abkd.training import Processes
from abkd.mass_concentration import concentration_stats


def gpt(seed, layers=2):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=40, n_positions=48,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, 40, (int(torch.randint(3, 6, (1,), generator=g)),), generator=g)
        r = torch.cat([p[:2], torch.tensor([0])])
        out.append(dict(input_ids=torch.cat([p, r]), labels=torch.cat([torch.full_like(p, -100), r])))
    return out


def collate(batch):
    w = max(r["input_ids"].numel() for r in batch)
    pad = lambda x, v: F.pad(x, (0, w - x.numel()), value=v)
    return dict(input_ids=torch.stack([pad(r["input_ids"], 0) for r in batch]),
                labels=torch.stack([pad(r["labels"], -100) for r in batch]),
                attention_mask=torch.stack([pad(torch.ones_like(r["input_ids"]), 0) for r in batch]))


@pytest.mark.parametrize("loss", ["ab", "fkl", "rkl", "js"])
def test_one_micro_batch_of_8_equals_8_of_1(loss):
    student, teacher = gpt(0), gpt(1, 3)
    ids = torch.randint(0, 40, (8, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone(); labels[:, :3] = -100; labels[5:, 8:] = -100
    cfg = LLMTrainConfig(loss=loss, loss_params=dict(alpha=0.2, beta=0.7) if loss == "ab" else {}, lm_weight=0.5)
    kd, n = make_kd_loss(cfg), int((labels[:, 1:] != -100).sum())
    def grads(chunks):
        student.zero_grad()
        for sl in chunks:
            with torch.no_grad(): t = teacher(ids[sl]).logits
            micro_batch_loss(cfg, student(ids[sl]).logits, labels[sl], n, t, kd).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()])
    one, eight = grads([slice(0, 8)]), grads([slice(i, i + 1) for i in range(8)])
    torch.testing.assert_close(one, eight, rtol=0, atol=1e-6 * one.abs().max().item())


def test_resume_equals_uninterrupted_and_selection(tmp_path):
    train, val = rows(24, 0), rows(8, 1)
    sft = LLMTrainConfig(mode="sft", epochs=2, micro_batch_size=8, lr=3e-3)
    fit_llm(sft, gpt(1, 3), train, val, collate, tmp_path / "t", progress=False)
    teacher = GPT2LMHeadModel.from_pretrained(tmp_path / "t" / "best")
    cfg = LLMTrainConfig(epochs=3, micro_batch_size=4, grad_accum=2, lr=3e-3, monitor_every=1)
    full = fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "a", teacher=teacher, progress=False)
    fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "b", teacher=teacher, progress=False, stop_after=1)
    resumed = fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "b", teacher=teacher, progress=False)
    assert [e["val_loss"] for e in resumed["epochs"]] == [e["val_loss"] for e in full["epochs"]]
    assert full["best"]["epoch"] == max(full["epochs"], key=lambda e: e["score"])["epoch"]
    assert any("monitor" in h for h in full["history"])
    other = LLMTrainConfig(epochs=4, micro_batch_size=4, grad_accum=2, lr=3e-3)
    with pytest.raises(ValueError, match="another configuration"):
        fit_llm(other, gpt(0), train, val, collate, tmp_path / "b", teacher=teacher, progress=False)


def test_student_outputs_and_replay(tmp_path):
    train, val = rows(16, 0), rows(8, 1)
    cfg = LLMTrainConfig(epochs=1, micro_batch_size=8, lr=1e-3, student_gen="mixed", student_gen_ratio=1.0,
                         monitor_every=0)
    fit_llm(cfg, gpt(0), train, val, collate, tmp_path, teacher=gpt(1, 3), progress=False)
    replay = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["replay"]
    assert len(replay) == 16
    for ids, lab in replay:
        n = prompt_lengths(lab[None])[0]
        assert (lab[:n] == -100).all() and (lab[n:] != -100).any()
    buf = ReplayBuffer(3)
    buf.add(torch.ones(5, 4, dtype=torch.long), torch.ones(5, 4, dtype=torch.long))
    assert len(buf.rows) == 3
    a = LLMTrainConfig(student_gen="adaptive", student_gen_ratio=0.5, student_gen_step=0.2)
    assert [update_gen_prob(a, 0.4, 1.0, 1.1), update_gen_prob(a, 0.4, 1.0, 0.9)] == [0.5, 0.4]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        LLMTrainConfig(mode="rl")
    with pytest.raises(ValueError, match="loss must be one of"):
        LLMTrainConfig(loss="mse")
    with pytest.raises(ValueError, match="student_gen"):
        LLMTrainConfig(student_gen="always")
    with pytest.raises(ValueError, match="needs a teacher"):
        fit_llm(LLMTrainConfig(), gpt(0), rows(4, 0), rows(2, 1), collate, tmp_path, progress=False)
    # a teacher with another vocabulary: the loss zoo's vocab policy error names the fix
    cfg = LLMTrainConfig(epochs=1, micro_batch_size=4)
    t = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=44, n_positions=48))
    with pytest.raises(ValueError, match="vocab"):
        fit_llm(cfg, gpt(0), rows(4, 0), rows(2, 1), collate, tmp_path / "v", teacher=t, progress=False)


def test_non_finite_loss_stops_before_the_update(tmp_path):
    class NaNLoss(torch.nn.Module):
        def forward(self, s, t, mask=None): return s.sum() * float("nan")
    cfg = LLMTrainConfig(epochs=1, micro_batch_size=4, monitor_every=0)
    student = gpt(0)
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(FloatingPointError, match="at epoch 1, step 0: lower the learning rate"):
        fit_llm(cfg, student, rows(8, 0), rows(2, 1), collate, tmp_path, teacher=gpt(1, 3), progress=False,
                kd_loss=NaNLoss())
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert not (tmp_path / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ validation set, monitor, fused loss
def test_no_validation_set_keeps_the_last_epoch(tmp_path):
    cfg = LLMTrainConfig(epochs=2, micro_batch_size=8, lr=3e-3, monitor_every=0)
    res = fit_llm(cfg, gpt(0), rows(16, 0), None, collate, tmp_path, teacher=gpt(1, 3), progress=False)
    assert res["selection"] == "last epoch (no validation set)"
    assert res["best"]["epoch"] == 2 and res["finished"]
    assert [e["val_loss"] for e in res["epochs"]] == [None, None]
    kept = GPT2LMHeadModel.from_pretrained(tmp_path / "best").state_dict()
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(kept[k], last[k]) for k in kept)
    with_val = fit_llm(cfg, gpt(0), rows(16, 0), rows(4, 1), collate, tmp_path / "v", teacher=gpt(1, 3),
                       progress=False)
    assert with_val["selection"] == "lowest validation loss after an epoch"
    assert all(isinstance(e["val_loss"], float) for e in with_val["epochs"])


def test_empty_or_unusable_data_refused_before_any_work(tmp_path):
    cfg = LLMTrainConfig(epochs=1, micro_batch_size=4, monitor_every=0)
    with pytest.raises(ValueError, match=r"val_set is empty.*val_set=None to train without selection"):
        fit_llm(cfg, gpt(0), rows(4, 0), [], collate, tmp_path / "a", teacher=gpt(1), progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="train_set is empty"):
        fit_llm(cfg, gpt(0), [], rows(2, 1), collate, tmp_path / "b", teacher=gpt(1), progress=False)
    adaptive = LLMTrainConfig(epochs=1, micro_batch_size=4, student_gen="adaptive")
    with pytest.raises(ValueError, match="needs a val_set.*student_gen='mixed'"):
        fit_llm(adaptive, gpt(0), rows(4, 0), None, collate, tmp_path / "c", teacher=gpt(1), progress=False)
    unsupervised = [dict(r, labels=torch.full_like(r["labels"], -100)) for r in rows(2, 1)]
    with pytest.raises(ValueError, match="no supervised token.*val_set=None"):
        fit_llm(cfg, gpt(0), rows(4, 0), unsupervised, collate, tmp_path / "d", teacher=gpt(1), progress=False)
    with pytest.raises(ValueError, match="kd_loss is not used with fused_loss=True"):
        fit_llm(LLMTrainConfig(fused_loss=True), gpt(0), rows(4, 0), None, collate, tmp_path / "e", teacher=gpt(1),
                progress=False, kd_loss=make_kd_loss(LLMTrainConfig()))


def _stats(d):
    return {k: v for k, v in d.items() if k not in ("rows", "supervised")}


def _direct_stats(s_rows, t_rows):
    return concentration_stats(s_rows, t_rows, alpha=0.2, beta=0.7)


def test_monitor_with_vocab_policy(tmp_path):
    """A teacher with 4 more ids: the monitor maps the rows as the loss does (pad: the student's extra ids at −inf;
    truncate: the teacher's extra ids dropped), and a run with the monitor on at every step works."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 9, 40, generator=g), torch.randn(2, 9, 40, generator=g)
    t_big = torch.cat([t, torch.full((2, 9, 4), -30.0)], -1)
    lab = torch.randint(0, 40, (2, 9), generator=g); lab[:, :3] = -100
    sup = lab[:, 1:] != -100
    sr, tr = s[:, :-1][sup], t_big[:, :-1][sup]
    for policy, (es, et) in {"pad": (torch.cat([sr, torch.full((sr.shape[0], 4), float("-inf"))], -1), tr),
                             "truncate": (sr, tr[:, :40])}.items():
        cfg = LLMTrainConfig(monitor_rows=64, loss_params=dict(alpha=0.2, beta=0.7, vocab_policy=policy))
        got = monitor_stats(cfg, s, lab, t_big)
        assert _stats(got) == _direct_stats(es, et)
        assert (got["rows"], got["supervised"]) == (int(sup.sum()), int(sup.sum()))
    with pytest.raises(ValueError, match="vocab_policy='truncate' would drop"):   # the loss's own mass check
        monitor_stats(LLMTrainConfig(loss_params=dict(alpha=0.2, beta=0.7, vocab_policy="truncate")), s, lab,
                      torch.cat([t, torch.zeros(2, 9, 4)], -1))
    wide = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=44, n_positions=48,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    cfg = LLMTrainConfig(epochs=1, micro_batch_size=4, monitor_every=1,
                         loss_params=dict(alpha=0.2, beta=0.7, vocab_policy="pad"))
    res = fit_llm(cfg, gpt(0), rows(8, 0), rows(2, 1), collate, tmp_path, teacher=wide, progress=False)
    mons = [h["monitor"] for h in res["history"] if "monitor" in h]
    assert len(mons) == 2 and all(torch.isfinite(torch.tensor(list(m.values()), dtype=torch.float64)).all()
                                  for m in mons)


def test_monitor_subsamples_supervised_positions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 30, 40, generator=g), torch.randn(4, 30, 40, generator=g)
    lab = torch.randint(0, 40, (4, 30), generator=g); lab[:, :5] = -100; lab[2, 20:] = -100
    mask = lab[:, 1:] != -100
    n_sup = int(mask.sum())
    assert n_sup > 12
    a, a2, b = monitor_rows(mask, 12, 5), monitor_rows(mask, 12, 5), monitor_rows(mask, 12, 6)
    assert a.shape == (12, 2) and torch.equal(a, a2) and not torch.equal(a, b)
    flat = a[:, 0] * mask.shape[1] + a[:, 1]
    assert bool((flat.diff() > 0).all()) and bool(mask[a[:, 0], a[:, 1]].all())     # distinct, in order, supervised
    cfg = LLMTrainConfig(monitor_rows=12)
    got = monitor_stats(cfg, s, lab, t, seed=5)
    assert (got["rows"], got["supervised"]) == (12, n_sup)
    assert got == monitor_stats(cfg, s, lab, t, seed=5)
    assert _stats(got) == _direct_stats(s[:, :-1][a[:, 0], a[:, 1]], t[:, :-1][a[:, 0], a[:, 1]])
    every = monitor_stats(LLMTrainConfig(monitor_rows=n_sup), s, lab, t)          # not more: all, in order
    assert every["rows"] == n_sup and _stats(every) == _direct_stats(s[:, :-1][mask], t[:, :-1][mask])
    assert torch.equal(monitor_rows(mask, n_sup + 1, 0), mask.nonzero())


def test_fused_loss_equals_materialized(tmp_path):
    student, teacher = gpt(0), gpt(1, 3)
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone(); labels[:, :4] = -100; labels[2:, 9:] = -100
    n = int((labels[:, 1:] != -100).sum())
    cfg = LLMTrainConfig(fused_loss=True, loss_params=dict(alpha=0.3, beta=0.6, temperature=1.5))
    kd = make_kd_loss(cfg)
    with torch.no_grad(): t_logits = teacher(ids).logits
    def loss_and_grad(fused):
        student.zero_grad()
        if fused:
            out = student(ids, output_hidden_states=True, logits_to_keep=1)
            loss = fused_micro_batch_loss(cfg, out.hidden_states[-1], output_head(student), labels, n, t_logits, kd)
        else:
            loss = micro_batch_loss(cfg, student(ids).logits, labels, n, t_logits, kd)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()])
    (lf, gf), (lm, gm) = loss_and_grad(True), loss_and_grad(False)
    torch.testing.assert_close(lf, lm, rtol=1e-6, atol=0)
    torch.testing.assert_close(gf, gm, rtol=0, atol=1e-5 * gm.abs().max().item())
    # the same through fit_llm: the losses, validation losses and monitor statistics agree
    run = dict(epochs=1, micro_batch_size=4, lr=3e-3, monitor_every=1, monitor_rows=4)
    train, val = rows(8, 0), rows(4, 1)
    a = fit_llm(LLMTrainConfig(**run), gpt(0), train, val, collate, tmp_path / "m", teacher=gpt(1, 3), progress=False)
    b = fit_llm(LLMTrainConfig(**run, fused_loss=True), gpt(0), train, val, collate, tmp_path / "f",
                teacher=gpt(1, 3), progress=False)
    assert a["epochs"][0]["train_loss"] == pytest.approx(b["epochs"][0]["train_loss"], rel=1e-5)
    assert a["epochs"][0]["val_loss"] == pytest.approx(b["epochs"][0]["val_loss"], rel=1e-5)
    ma, mb = ([h["monitor"] for h in r["history"] if "monitor" in h] for r in (a, b))
    assert len(ma) == len(mb) == 2
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys() and x["rows"] == 4
        assert all(x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6) for k in x)


class ScaledLogitsGPT2(GPT2LMHeadModel):
    "A GPT-2 that scales its logits after the head (as logit_scale or softcapping models do)."
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2.0 * out.logits
        return out


def test_fused_loss_counts_a_head_bias_and_a_lora_adapter():
    "The fused loss applies the output layer as a module: a bias or a PEFT LoRA on lm_head changes it as it should."
    from peft import LoraConfig, get_peft_model
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone(); labels[:, :4] = -100
    n = int((labels[:, 1:] != -100).sum())
    cfg = LLMTrainConfig(fused_loss=True)
    kd = make_kd_loss(cfg)
    with torch.no_grad(): t_logits = gpt(1, 3)(ids).logits
    biased = gpt(0)
    biased.lm_head = torch.nn.Linear(32, 40, bias=True)
    lora = get_peft_model(gpt(0), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    for student in (biased, lora):
        out = student(ids, output_hidden_states=True, logits_to_keep=1)
        fused = fused_micro_batch_loss(cfg, out.hidden_states[-1], output_head(student), labels, n, t_logits, kd)
        materialized = micro_batch_loss(cfg, student(ids).logits, labels, n, t_logits, kd)
        torch.testing.assert_close(fused, materialized, rtol=1e-5, atol=0)


def test_fused_loss_refuses_logits_changed_after_the_head(tmp_path):
    cfg = LLMTrainConfig(epochs=1, micro_batch_size=4, fused_loss=True)
    scaled = ScaledLogitsGPT2(gpt(0).config)
    with pytest.raises(ValueError, match="differ from its output head.*set fused_loss=False"):
        fit_llm(cfg, scaled, rows(4, 0), None, collate, tmp_path / "b", teacher=gpt(1), progress=False)


BAD_CONFIGS = [
    (dict(mode="rl"), "mode"), (dict(loss="mse"), "loss"), (dict(epochs=0), "epochs"), (dict(epochs=-2), "epochs"),
    (dict(micro_batch_size=0), "micro_batch_size"), (dict(micro_batch_size=2.5), "micro_batch_size"),
    (dict(grad_accum=0), "grad_accum"), (dict(grad_accum=True), "grad_accum"), (dict(lr=0), "lr"),
    (dict(lr=-1e-3), "lr"), (dict(lr=float("inf")), "lr"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(seed=-1), "seed"),
    (dict(seed="10"), "seed"), (dict(lm_weight=-0.5), "lm_weight"), (dict(lm_weight=float("nan")), "lm_weight"),
    (dict(student_gen="always"), "student_gen"), (dict(student_gen_ratio=1.5), "student_gen_ratio"),
    (dict(student_gen_step=-0.1), "student_gen_step"), (dict(replay_size=0), "replay_size"),
    (dict(teacher_dtype="fp8"), "teacher_dtype"), (dict(monitor_every=-1), "monitor_every"),
    (dict(monitor_rows=0), "monitor_rows"), (dict(monitor_rows=-4), "monitor_rows"),
    (dict(fused_loss="yes"), "fused_loss"), (dict(loss_params=(0.2, 0.7)), "loss_params"),
    (dict(loss_params=dict(alpha=0.2, beta=0.7, reduction="mean")), "loss_params"),
    (dict(loss_params=dict(alpha=0.2)), "loss_params"), (dict(loss_params=dict(alpha=0.2, beta=0.7, gamma=1)), "loss_params"),
    (dict(loss_params=dict(alpha=0.2, beta=0.7, vocab_policy="clip")), "loss_params"),
    (dict(fused_loss=True, loss="fkl", loss_params={}), "fused_loss=False"),
    (dict(fused_loss=True, mode="sft"), "fused_loss=False"), (dict(fused_loss=True, lm_weight=0.5), "lm_weight"),
    (dict(fused_loss=True, loss_params=dict(alpha=0.2, beta=0.7, vocab_policy="pad")), "vocab_policy"),
    (dict(kd_ratio=1.5), "kd_ratio"), (dict(kd_ratio=-0.1), "kd_ratio"), (dict(kd_ratio=float("nan")), "kd_ratio"),
    (dict(fused_loss=True, kd_ratio=0.5), "kd_ratio"),
]


@pytest.mark.parametrize("kwargs,name", BAD_CONFIGS, ids=[repr(k) for k, _ in BAD_CONFIGS])
def test_bad_config_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError) as e:
        LLMTrainConfig(**kwargs)
    msg = str(e.value)
    assert name in msg
    assert any(w in msg for w in ("must be", "needs", "unknown", "remove", "set ")), msg   # says what to pass


def test_good_config_values_accepted():
    LLMTrainConfig(max_grad_norm=None, warmup_steps=0, monitor_every=0, lm_weight=0, lr=1, seed=0)
    LLMTrainConfig(mode="sft", loss_params={})                     # sft does not build the loss
    LLMTrainConfig(fused_loss=True, loss_params=dict(alpha=0.2, beta=0.7, temperature=2.0, vocab_policy="error"))


# ------------------------------------------------------------------------------ the LM term on a corpus, accumulation
def varied_rows(n, seed):
    "Prompt 2–5 tokens, response 1–8 tokens + EOS: examples carry different numbers of loss tokens."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        r = torch.cat([torch.randint(3, 40, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g),
                       torch.tensor([0])])
        out.append(dict(input_ids=torch.cat([p, r]), labels=torch.cat([torch.full_like(p, -100), r])))
    return out


def corpus_rows(n, length, seed):
    "Pre-training blocks: every next token supervised (labels = input_ids), as abkd.llm.data.read_lm_corpus makes them."
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randint(0, 40, (length,), generator=g) for _ in range(n)]
    return [dict(input_ids=b, labels=b.clone()) for b in blocks]


def test_official_weights_and_default_combination():
    assert official_loss_weights() == dict(kd_ratio=1.0, lm_weight=1.0)          # ABKD/DistiLLM scripts: kd-ratio 1
    assert official_loss_weights(0.5, with_corpus=False) == dict(kd_ratio=0.5, lm_weight=0.0)
    cfg = LLMTrainConfig(**official_loss_weights())
    assert (cfg.kd_ratio, cfg.lm_weight) == (1.0, 1.0)


def test_step_loss_is_the_official_combination():
    """One step through the trainer's accumulation equals, in gradient, the reference
    kd_ratio·ΣKD/N + (1 − kd_ratio)·ΣCE/N + lm_weight·mean CE(corpus), computed over the whole step at once."""
    student, teacher = gpt(0), gpt(1, 3).requires_grad_(False)
    train, corpus = varied_rows(12, 3), corpus_rows(12, 9, 4)
    cfg = LLMTrainConfig(kd_ratio=0.6, lm_weight=0.8, micro_batch_size=4, grad_accum=3)
    kd = make_kd_loss(cfg)
    batches = [collate(train[i:i + 4]) for i in range(0, 12, 4)]
    lm_batches = [collate(corpus[i:i + 4]) for i in range(0, 12, 4)]
    student.zero_grad()
    T._accumulate(cfg, Processes(None, "cpu"), student, None, teacher, batches, kd, lm_batches)
    got = torch.cat([p.grad.flatten() for p in student.parameters()])
    student.zero_grad()
    whole, lm_whole = collate(train), collate(corpus)
    logits = student(whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    with torch.no_grad(): t = teacher(whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    s, lab, mask = T.align_next_token(logits, labels=whole["labels"])
    tt, _, _ = T.align_next_token(t, labels=whole["labels"])
    n = mask.sum()
    ce_sum = F.cross_entropy(s.reshape(-1, 40), lab.reshape(-1), ignore_index=-100, reduction="sum")
    c_logits = student(lm_whole["input_ids"]).logits
    ce_corpus = F.cross_entropy(c_logits[:, :-1].reshape(-1, 40), lm_whole["labels"][:, 1:].reshape(-1))   # token mean
    ref = 0.6 * kd(s, tt, mask=mask) / n + 0.4 * ce_sum / n + 0.8 * ce_corpus
    ref.backward()
    want = torch.cat([p.grad.flatten() for p in student.parameters()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("with_corpus", [False, True])
def test_micro_8_accum_4_equals_micro_32_accum_1(tmp_path, with_corpus):
    """Global batch 32: micro-batches of 8 with 4 accumulation steps give the same run as one micro-batch of 32
    (examples with 2–9 loss tokens; weight decay on; with and without the corpus LM term) — over 3 optimiser steps, so
    Adam's update depends on the gradients' magnitudes, not only their signs. Float64: Adam's first step divides by
    |g| + eps, which turns float32 rounding in tiny gradients into visible differences."""
    train, corpus = varied_rows(96, 0), corpus_rows(40, 12, 5)
    final = {}
    for mb, ga in ((8, 4), (32, 1)):
        cfg = LLMTrainConfig(epochs=1, micro_batch_size=mb, grad_accum=ga, lr=1e-3, weight_decay=0.01, kd_ratio=0.5,
                             lm_weight=0.7, monitor_every=0)
        model = gpt(0).double()
        res = fit_llm(cfg, model, train, None, collate, tmp_path / f"{mb}x{ga}", teacher=gpt(1, 3).double(),
                      progress=False, lm_set=corpus if with_corpus else None)
        final[mb] = (model.state_dict(), res["epochs"][0])
    (a, ea), (b, eb) = final[8], final[32]
    start = gpt(0).double().state_dict()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and gap < 1e-9 * moved, (gap, moved)
    assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-5)
    if with_corpus: assert ea["lm_corpus_loss"] == pytest.approx(eb["lm_corpus_loss"], rel=1e-5)


def test_a_per_micro_batch_mean_would_differ():
    "The test above can fail: normalising each micro-batch by its own tokens changes the gradient (varied lengths)."
    student, teacher = gpt(0), gpt(1, 3)
    train = varied_rows(32, 0)
    cfg = LLMTrainConfig(kd_ratio=0.5)
    kd = make_kd_loss(cfg)
    def grads(normalise_each):
        student.zero_grad()
        batches = [collate(train[i:i + 8]) for i in range(0, 32, 8)]
        n_all = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum()) * 4 if normalise_each else n_all
            with torch.no_grad(): t = teacher(b["input_ids"], attention_mask=b["attention_mask"]).logits
            micro_batch_loss(cfg, student(b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], n,
                             t, kd).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()])
    ours, naive = grads(False), grads(True)
    assert (ours - naive).abs().max() > 1e-3 * ours.abs().max()


def test_corpus_stream_is_seeded_cycled_and_resumable():
    data = list(range(10))
    s = CorpusStream(data, seed=3)
    first = s.take(25)
    assert sorted(first[:10]) == data and sorted(first[10:20]) == data and first[:10] != first[10:20]
    assert CorpusStream(data, seed=3).take(25) == first
    resumed = CorpusStream(data, seed=3, pos=7)
    assert resumed.take(18) == first[7:25]
    assert CorpusStream(data, seed=4).take(10) != first[:10]


def test_lm_set_run_resumes_exactly_and_is_recorded(tmp_path):
    train, val, corpus = varied_rows(24, 0), varied_rows(8, 1), corpus_rows(10, 12, 7)
    cfg = LLMTrainConfig(epochs=3, micro_batch_size=4, grad_accum=2, lr=3e-3, lm_weight=1.0, monitor_every=0)
    full = fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "a", teacher=gpt(1, 3), progress=False, lm_set=corpus)
    fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False, lm_set=corpus,
            stop_after=1)
    resumed = fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False,
                      lm_set=corpus)
    assert [(e["val_loss"], e["lm_corpus_loss"]) for e in resumed["epochs"]] == \
        [(e["val_loss"], e["lm_corpus_loss"]) for e in full["epochs"]]
    assert all(math.isfinite(e["lm_corpus_loss"]) for e in full["epochs"])
    assert full["lm_term"]["corpus"] == "lm_set (10 examples, weight 1)" and full["lm_term"]["corpus_examples"] == 10
    assert full["lm_term"]["instruction"] == "instruction batch (weight 0)"
    on_batch = fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "c", teacher=gpt(1, 3), progress=False)
    assert on_batch["lm_term"]["corpus"] is None and on_batch["lm_term"]["instruction"] == "instruction batch (weight 1)"
    assert all(e["lm_corpus_loss"] is None for e in on_batch["epochs"])
    assert [e["val_loss"] for e in on_batch["epochs"]] != [e["val_loss"] for e in full["epochs"]]
    with pytest.raises(ValueError, match="another corpus.*same lm_set, resume=False, or another out_dir"):
        fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False,
                lm_set=corpus_rows(10, 12, 8))
    sft = LLMTrainConfig(mode="sft", epochs=1, micro_batch_size=4, lm_weight=0.5)
    res = fit_llm(sft, gpt(0), train, None, collate, tmp_path / "s", progress=False, lm_set=corpus)
    assert res["lm_term"]["corpus"] == "lm_set (10 examples, weight 0.5)"


def test_lm_set_bad_inputs(tmp_path):
    train, corpus = rows(4, 0), corpus_rows(4, 8, 0)
    with pytest.raises(ValueError, match="lm_set is given but cfg.lm_weight is 0.*set lm_weight > 0.*lm_set=None"):
        fit_llm(LLMTrainConfig(epochs=1), gpt(0), train, None, collate, tmp_path / "a", teacher=gpt(1),
                progress=False, lm_set=corpus)
    with pytest.raises(ValueError, match="lm_set is empty.*read_lm_corpus"):
        fit_llm(LLMTrainConfig(epochs=1, lm_weight=1.0), gpt(0), train, None, collate, tmp_path / "b",
                teacher=gpt(1), progress=False, lm_set=[])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------ weight decay
def test_weight_decay_groups_follow_the_official():
    model = gpt(0)
    groups = optimizer_param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.01, 0.0)
    assert exempt == {n for n in names.values() if n.endswith(".bias") or ".ln_" in n}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert all(any(k in n for k in NO_DECAY) for n in exempt)


def test_weight_decay_is_decoupled_and_skips_the_exempt(tmp_path):
    "One step with wd = 0.1 vs 0: decayed weights differ by exactly lr·wd·w0 (AdamW), biases and LayerNorms not at all."
    train, runs = varied_rows(8, 0), {}
    for wd in (0.0, 0.1):
        model = gpt(0)
        fit_llm(LLMTrainConfig(epochs=1, micro_batch_size=8, lr=1e-2, weight_decay=wd, monitor_every=0), model, train,
                None, collate, tmp_path / str(wd), teacher=gpt(1, 3), progress=False)
        runs[wd] = dict(model.named_parameters())
    start = dict(gpt(0).named_parameters())
    for n, w0 in start.items():
        diff = (runs[0.1][n] - runs[0.0][n]).detach()
        want = torch.zeros_like(w0) if any(k in n for k in NO_DECAY) else -1e-2 * 0.1 * w0.detach()
        torch.testing.assert_close(diff, want, rtol=0, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------ PEFT LoRA students
def tiny_llama_base(path, seed=0):
    "A tiny random LLaMA saved to `path` and loaded back (the base a LoRA adapter's config points to)."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=40, max_position_embeddings=64, bos_token_id=0,
                                 eos_token_id=0, pad_token_id=0)).save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path)


def lora(model, targets, seed=0):
    "`model` with LoRA adapters on `targets` (their random init seeded: peft draws it from the global generator)."
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))


def test_lora_llama_student_trains_resumes_and_loads(tmp_path):
    train, corpus = varied_rows(16, 0), corpus_rows(8, 10, 1)
    cfg = LLMTrainConfig(epochs=2, micro_batch_size=4, grad_accum=2, lr=5e-3, weight_decay=0.01, lm_weight=1.0,
                         monitor_every=1)
    base_dir = tmp_path / "base"
    student = lora(tiny_llama_base(base_dir), ["q_proj", "v_proj"])
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    full = fit_llm(cfg, student, train, None, collate, tmp_path / "a", teacher=gpt(1, 3), progress=False, lm_set=corpus)
    now = dict(student.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in frozen.items())                     # the base is not trained
    assert all(not torch.equal(now[n], w) for n, w in trainable.items() if "lora_B" in n)
    again = lora(tiny_llama_base(tmp_path / "base2"), ["q_proj", "v_proj"])
    fit_llm(cfg, again, train, None, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False, lm_set=corpus,
            stop_after=1)
    again = lora(tiny_llama_base(tmp_path / "base2"), ["q_proj", "v_proj"])
    resumed = fit_llm(cfg, again, train, None, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False,
                      lm_set=corpus)
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in full["epochs"]]
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    best = tmp_path / "a" / "best"
    assert (best / "adapter_config.json").is_file() and not (best / "model.safetensors").exists()
    merged = load_trained(best)
    assert not hasattr(merged, "peft_config") and type(merged).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, student(ids).logits, rtol=0, atol=1e-5)


def test_lora_head_with_the_fused_loss_trains_as_the_materialized(tmp_path):
    train, val = varied_rows(16, 0), varied_rows(4, 1)
    gpt(0).save_pretrained(tmp_path / "base")
    run = dict(epochs=2, micro_batch_size=8, lr=3e-3, monitor_every=0)
    out = {}
    for fused in (False, True):
        student = lora(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), ["c_attn", "lm_head"])
        out[fused] = fit_llm(LLMTrainConfig(**run, fused_loss=fused), student, train, val, collate,
                             tmp_path / str(fused), teacher=gpt(1, 3), progress=False)
    gap = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(out[False]["epochs"], out[True]["epochs"]))
    assert gap < 1e-4
    assert isinstance(load_trained(tmp_path / "True" / "best"), GPT2LMHeadModel)


def test_load_trained_full_model_and_bad_folders(tmp_path):
    model = gpt(0)
    fit_llm(LLMTrainConfig(mode="sft", epochs=1, micro_batch_size=4), model, rows(4, 0), None, collate,
            tmp_path / "sft", progress=False)
    loaded = load_trained(tmp_path / "sft" / "best")
    assert isinstance(loaded, GPT2LMHeadModel)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.*out_dir/best"):
        load_trained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist.*out_dir/best"):
        load_trained(tmp_path / "nowhere")


def test_lora_student_built_in_memory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="base model has no name or path.*from_pretrained"):
        fit_llm(LLMTrainConfig(mode="sft", epochs=1, micro_batch_size=4), lora(gpt(0), ["c_attn"]), rows(4, 0),
                None, collate, tmp_path, progress=False)


# ------------------------------------------------------------------------------ max_steps, step-level evaluation, resume
def dropout_gpt(seed):
    "A tiny GPT-2 with dropout on: a resumed run repeats the uninterrupted one only if the random streams are restored."
    config = gpt(seed).config
    config.resid_pdrop = config.attn_pdrop = 0.1
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


class LrTrace(torch.optim.AdamW):
    "AdamW recording its learning rate at every step."
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs); self.trace = []
    def step(self, closure=None):
        self.trace.append(self.param_groups[0]["lr"]); return super().step(closure)


def _weights_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_max_steps_overrides_epochs_and_sets_the_schedule(tmp_path):
    "20 examples / micro-batch 4 = 5 steps an epoch; max_steps=7: 2 epochs, the second cut at 2 steps."
    train, val = varied_rows(20, 0), varied_rows(6, 1)
    base = dict(micro_batch_size=4, lr=3e-3, warmup_steps=2, monitor_every=0)
    opts = []
    factory = lambda groups: opts.append(LrTrace(groups, lr=3e-3)) or opts[-1]
    res = fit_llm(LLMTrainConfig(**base, epochs=9, max_steps=7), gpt(0), train, val, collate, tmp_path / "m",
                  teacher=gpt(1, 3), progress=False, optimizer_factory=factory)
    want = [3e-3 * (k + 1) / 2 if k < 2 else 3e-3 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 5)) for k in range(7)]
    assert opts[0].trace == pytest.approx(want, rel=1e-12, abs=0)
    assert res["steps"] == dict(done=7, total=7, per_epoch=5, epochs=2) and res["finished"]
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=False)["scheduler"]["last_epoch"] == 7
    # max_steps = epochs × steps per epoch is the epochs run, bit for bit
    a, b = gpt(0), gpt(0)
    ra = fit_llm(LLMTrainConfig(**base, epochs=2), a, train, val, collate, tmp_path / "e", teacher=gpt(1, 3),
                 progress=False)
    rb = fit_llm(LLMTrainConfig(**base, epochs=5, max_steps=10), b, train, val, collate, tmp_path / "s",
                 teacher=gpt(1, 3), progress=False)
    assert _weights_equal(a, b) and [e["val_loss"] for e in ra["epochs"]] == [e["val_loss"] for e in rb["epochs"]]


def test_interrupted_mid_epoch_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    """Dropout on, student outputs on half of the steps, a corpus LM term, the monitor and step-level evaluation:
    stopped at step 2 (mid-epoch), at 5 (an epoch's end), at 6 (mid-epoch), then run to 7 — equal to one call."""
    train, val, corpus = varied_rows(20, 0), varied_rows(6, 1), corpus_rows(9, 10, 2)
    cfg = LLMTrainConfig(max_steps=7, micro_batch_size=4, lr=3e-3, lm_weight=0.5, student_gen="mixed",
                         student_gen_ratio=0.5, monitor_every=2, eval_every=3)
    run = lambda model, d, **kw: fit_llm(cfg, model, train, val, collate, tmp_path / d, teacher=gpt(1, 3),
                                         progress=False, lm_set=corpus, **kw)
    full_model = dropout_gpt(0)
    full = run(full_model, "full")
    for n in (2, 3, 1):
        part = run(dropout_gpt(0), "parts", stop_after_steps=n)
        assert not part["finished"]
    assert part["steps"]["done"] == 6
    resumed_model = dropout_gpt(0)
    resumed = run(resumed_model, "parts")
    assert resumed["finished"] and _weights_equal(full_model, resumed_model)
    assert resumed["history"] == full["history"] and resumed["best"] == full["best"]
    assert any(h["gen_prob"] is not None for h in full["epochs"])
    # the control: without restoring the random streams mid-epoch the resumed run differs (dropout)
    run(dropout_gpt(0), "control", stop_after_steps=2)
    monkeypatch.setattr(T, "_set_rng_state", lambda *a, **k: None)
    control_model = dropout_gpt(0)
    run(control_model, "control")
    assert not _weights_equal(full_model, control_model)


def test_save_every_resumes_after_a_crash(tmp_path):
    "A run that dies at step 4 resumes from its step-3 checkpoint (save_every=3) and ends as the uninterrupted run."
    train = varied_rows(24, 0)
    cfg = LLMTrainConfig(max_steps=5, micro_batch_size=4, lr=3e-3, save_every=3, monitor_every=0)
    class Crash(torch.nn.Module):
        def __init__(self, at): super().__init__(); self.loss, self.calls, self.at = make_kd_loss(cfg), 0, at
        def forward(self, s, t, mask=None):
            self.calls += 1
            if self.calls == self.at: raise RuntimeError("preempted")
            return self.loss(s, t, mask=mask)
    full_model = dropout_gpt(0)
    fit_llm(cfg, full_model, train, None, collate, tmp_path / "a", teacher=gpt(1, 3), progress=False,
            kd_loss=Crash(0))
    with pytest.raises(RuntimeError, match="preempted"):
        fit_llm(cfg, dropout_gpt(0), train, None, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False,
                kd_loss=Crash(4))
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["state"]
    assert (saved["step"], saved["epoch_step"]) == (3, 3) and "rng" in saved
    resumed_model = dropout_gpt(0)
    fit_llm(cfg, resumed_model, train, None, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False,
            kd_loss=Crash(0))
    assert _weights_equal(full_model, resumed_model)


def test_step_level_evaluation_selects_the_best_step(tmp_path):
    "eval_every=2 over 7 steps evaluates at steps 2, 4, 6 and 7; the best score's step is the one kept in out_dir/best."
    train, val = varied_rows(20, 0), varied_rows(6, 1)
    snapshots, scores = [], [0.1, 0.5, 0.3, 0.2]
    def select_fn(model):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return scores[len(snapshots) - 1]
    cfg = LLMTrainConfig(max_steps=7, micro_batch_size=4, lr=3e-3, eval_every=2, monitor_every=0)
    res = fit_llm(cfg, gpt(0), train, val, collate, tmp_path, teacher=gpt(1, 3), progress=False, select_fn=select_fn)
    assert [(e["epoch"], e["step"], e["score"]) for e in res["epochs"]] == [(1, 2, 0.1), (1, 4, 0.5), (2, 6, 0.3),
                                                                            (2, 7, 0.2)]
    assert all(isinstance(e["val_loss"], float) and e["lr"] > 0 for e in res["epochs"][:-1])
    assert res["best"]["step"] == 4 and res["best"]["score"] == 0.5
    assert res["selection"] == "highest select_fn(model) after every 2 optimizer steps"
    kept = GPT2LMHeadModel.from_pretrained(tmp_path / "best").state_dict()
    assert all(torch.equal(kept[k], snapshots[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], snapshots[2][k]) for k in kept)
    plain = fit_llm(LLMTrainConfig(max_steps=4, micro_batch_size=4, lr=3e-3, eval_every=2, monitor_every=0), gpt(0),
                    train, val, collate, tmp_path / "v", teacher=gpt(1, 3), progress=False)
    assert plain["best"]["step"] == min(plain["epochs"], key=lambda e: e["val_loss"])["step"]
    with pytest.raises(ValueError, match="eval_every=2.*no val_set and no select_fn.*eval_every=0"):
        fit_llm(cfg, gpt(0), train, None, collate, tmp_path / "n", teacher=gpt(1, 3), progress=False)
    with pytest.raises(ValueError, match="stop_after_steps must be"):
        fit_llm(cfg, gpt(0), train, val, collate, tmp_path / "n", teacher=gpt(1, 3), progress=False,
                stop_after_steps=0)


# ------------------------------------------------------------------------------ a user optimizer and scheduler
def test_user_optimizer_and_scheduler(tmp_path):
    """SGD (no momentum) with a StepLR halving the rate each step: the first update is −0.1·g with g the gradient of
    ΣCE/N over the first step's batch computed here; three steps leave the rate at 0.1·0.5³; the checkpoint holds
    SGD's and StepLR's state and a resume equals one call; another optimizer on resume is refused."""
    from abkd.llm.train import default_optimizer_factory, default_scheduler_factory
    from abkd.training import epoch_loader
    train = varied_rows(24, 0)
    cfg = LLMTrainConfig(mode="sft", max_steps=3, micro_batch_size=8, max_grad_norm=None)
    sgd = lambda groups: torch.optim.SGD(groups, lr=0.1)
    halving = lambda opt, total: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    one = fit_llm(LLMTrainConfig(mode="sft", max_steps=1, micro_batch_size=8, max_grad_norm=None), model := gpt(0),
                  train, None, collate, tmp_path / "one", progress=False, optimizer_factory=sgd,
                  scheduler_factory=halving)
    assert one["optimizer"] == "torch.optim.sgd.SGD" and one["scheduler"] == "torch.optim.lr_scheduler.StepLR"
    ref = gpt(0)
    b = next(iter(epoch_loader(train, 8, cfg.seed, 0, collate_fn=collate)))
    logits = ref(b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    lab = b["labels"][:, 1:]
    (F.cross_entropy(logits.reshape(-1, 40), lab.reshape(-1), ignore_index=-100, reduction="sum") /
     (lab != -100).sum()).backward()
    for (n, p), (_, p0) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), (p0 - 0.1 * p0.grad).detach(), rtol=0, atol=1e-7, msg=n)
    full_model = dropout_gpt(0)
    fit_llm(cfg, full_model, train, None, collate, tmp_path / "a", progress=False, optimizer_factory=sgd,
            scheduler_factory=halving)
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert saved["scheduler"]["last_epoch"] == 3 and saved["optimizer"]["param_groups"][0]["lr"] == 0.1 * 0.5 ** 3
    fit_llm(cfg, dropout_gpt(0), train, None, collate, tmp_path / "b", progress=False, optimizer_factory=sgd,
            scheduler_factory=halving, stop_after_steps=1)
    resumed_model = dropout_gpt(0)
    fit_llm(cfg, resumed_model, train, None, collate, tmp_path / "b", progress=False, optimizer_factory=sgd,
            scheduler_factory=halving)
    assert _weights_equal(full_model, resumed_model)
    with pytest.raises(ValueError, match="optimizer torch.optim.sgd.SGD, now torch.optim.adamw.AdamW.*optimizer_factory"):
        fit_llm(cfg, gpt(0), train, None, collate, tmp_path / "b", progress=False, scheduler_factory=halving)
    with pytest.raises(ValueError, match="scheduler torch.optim.lr_scheduler.StepLR.*scheduler_factory"):
        fit_llm(cfg, gpt(0), train, None, collate, tmp_path / "b", progress=False, optimizer_factory=sgd)
    # the defaults passed explicitly are the defaults, bit for bit
    c = LLMTrainConfig(epochs=1, micro_batch_size=8, lr=3e-3, warmup_steps=1, weight_decay=0.1, monitor_every=0)
    x, y = gpt(0), gpt(0)
    fit_llm(c, x, train, None, collate, tmp_path / "x", teacher=gpt(1, 3), progress=False)
    fit_llm(c, y, train, None, collate, tmp_path / "y", teacher=gpt(1, 3), progress=False,
            optimizer_factory=default_optimizer_factory(c), scheduler_factory=default_scheduler_factory(c))
    assert _weights_equal(x, y)


def test_bad_optimizer_and_scheduler_factories(tmp_path):
    cfg = LLMTrainConfig(mode="sft", max_steps=1, micro_batch_size=4)
    fit = lambda d, **kw: fit_llm(cfg, gpt(0), rows(4, 0), None, collate, tmp_path / d, progress=False, **kw)
    with pytest.raises(TypeError, match="optimizer_factory must return a torch.optim.Optimizer.*got list"):
        fit("a", optimizer_factory=lambda groups: groups)
    with pytest.raises(ValueError, match="optimizer_factory returned an optimizer over 1 tensors"):
        fit("b", optimizer_factory=lambda groups: torch.optim.SGD(groups + [dict(params=[torch.zeros(2,
                                                                             requires_grad=True)])], lr=0.1))
    with pytest.raises(TypeError, match="scheduler_factory must return.*not ReduceLROnPlateau.*got ReduceLROnPlateau"):
        fit("c", scheduler_factory=lambda opt, total: torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


# ------------------------------------------------------------------------------ mixed precision, gradient checkpointing
def _dtypes_seen(model):
    """Output dtypes of an MLP projection inside the body and of the output head in the training forwards (those that
    build a graph: not validation, not the monitor, which forms its few rows' logits in float32)."""
    seen = dict(body=set(), head=set())
    record = lambda part: lambda m, i, o: seen[part].add(o.dtype) if torch.is_grad_enabled() else None
    model.transformer.h[0].mlp.c_fc.register_forward_hook(record("body"))
    model.lm_head.register_forward_hook(record("head"))
    return seen


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_student_on_the_cpu(tmp_path, fused):
    """mixed_precision='bf16': the student's matmuls run in bf16 (body and head, fused path included), the run is
    close to float32's; 'no' keeps float32."""
    train, val = varied_rows(16, 0), varied_rows(6, 1)
    out = {}
    for mp in ("no", "bf16"):
        model = gpt(0)
        seen = _dtypes_seen(model)
        cfg = LLMTrainConfig(max_steps=4, micro_batch_size=4, lr=3e-3, mixed_precision=mp, fused_loss=fused,
                             monitor_every=1)
        out[mp] = (fit_llm(cfg, model, train, val, collate, tmp_path / mp, teacher=gpt(1, 3), progress=False), seen)
    (f32, seen32), (b16, seen16) = out["no"], out["bf16"]
    assert seen32["body"] == {torch.float32} and seen16["body"] == {torch.bfloat16}
    assert seen16["head"] == {torch.bfloat16}               # fused: the head's chunks inside the same autocast
    assert b16["mixed_precision"] == "bf16"
    assert b16["epochs"][-1]["val_loss"] == pytest.approx(f32["epochs"][-1]["val_loss"], rel=2e-2)
    assert b16["epochs"][-1]["val_loss"] != f32["epochs"][-1]["val_loss"]
    mons = [h["monitor"] for h in b16["history"] if "monitor" in h]
    assert len(mons) == 4 and all(math.isfinite(v) for m in mons for v in m.values())


def test_fp16_student_scales_gradients_and_resumes(tmp_path):
    "mixed_precision='fp16': fp16 matmuls, a gradient scaler whose state is checkpointed and restored on resume."
    train = varied_rows(20, 0)
    cfg = LLMTrainConfig(max_steps=6, micro_batch_size=4, lr=3e-3, mixed_precision="fp16", monitor_every=0)
    full_model = gpt(0)
    seen = _dtypes_seen(full_model)
    fit_llm(cfg, full_model, train, None, collate, tmp_path / "a", teacher=gpt(1, 3), progress=False)
    assert seen["body"] == {torch.float16}
    scaler = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 6            # six unskipped steps
    fit_llm(cfg, gpt(0), train, None, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False, stop_after_steps=2)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["scaler"]["_growth_tracker"] == 2
    resumed_model = gpt(0)
    fit_llm(cfg, resumed_model, train, None, collate, tmp_path / "b", teacher=gpt(1, 3), progress=False)
    assert _weights_equal(full_model, resumed_model)


def test_mixed_precision_must_match_the_accelerator(tmp_path):
    from types import SimpleNamespace
    acc = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1, mixed_precision="no")
    with pytest.raises(ValueError, match="mixed_precision='bf16' but the accelerator.*Accelerator\\(mixed_precision"):
        fit_llm(LLMTrainConfig(mixed_precision="bf16"), gpt(0), rows(4, 0), None, collate, tmp_path / "a",
                teacher=gpt(1), accelerator=acc, progress=False)
    assert not (tmp_path / "a").exists()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    """gradient_checkpointing=True recomputes each block in backward (its forward runs twice per micro-batch) and
    gives the gradients and the run of the model without it."""
    train = varied_rows(16, 0)
    cfg = LLMTrainConfig(micro_batch_size=4, grad_accum=2, kd_ratio=0.5, monitor_every=0)
    grads, calls = {}, {}
    for gc in (False, True):
        model = gpt(0)
        if gc: T.enable_gradient_checkpointing(model)
        model.train()
        count, mlp = [], model.transformer.h[1].mlp          # (the block's forward is checkpointed, not its hooks)
        mlp.forward = lambda *a, _f=mlp.forward, **k: (count.append(1), _f(*a, **k))[1]
        batches = [collate(train[i:i + 4]) for i in range(0, 8, 4)]
        T._accumulate(cfg, Processes(None, "cpu"), model, None, gpt(1, 3).requires_grad_(False), batches,
                      make_kd_loss(cfg))
        grads[gc] = torch.cat([p.grad.flatten() for p in model.parameters()])
        calls[gc] = len(count)
    assert (calls[False], calls[True]) == (2, 4)
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=1e-6 * grads[False].abs().max().item())
    runs = {}
    for gc in (False, True):
        model = gpt(0)
        r = fit_llm(LLMTrainConfig(max_steps=3, micro_batch_size=4, lr=3e-3, gradient_checkpointing=gc,
                                   monitor_every=0), model, train, None, collate, tmp_path / str(gc),
                    teacher=gpt(1, 3), progress=False)
        runs[gc] = (model, r)
    assert runs[True][0].is_activation_checkpointing and runs[True][1]["gradient_checkpointing"]
    assert not runs[False][0].is_activation_checkpointing
    gap = max((a - b).abs().max().item() for a, b in zip(runs[True][0].state_dict().values(),
                                                          runs[False][0].state_dict().values()))
    assert gap < 1e-6
    plain = gpt(0)
    plain.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="gradient_checkpointing=True needs.*set gradient_checkpointing=False"):
        fit_llm(LLMTrainConfig(gradient_checkpointing=True), plain, rows(4, 0), None, collate, tmp_path / "x",
                teacher=gpt(1), progress=False)


def test_gradient_checkpointing_with_a_bf16_lora_student(tmp_path):
    "A LoRA LLaMA student with checkpointing (non-reentrant: its frozen embeddings need no input grads) in bf16."
    runs = {}
    for gc in (False, True):
        student = lora(tiny_llama_base(tmp_path / f"base{gc}"), ["q_proj", "v_proj"])
        runs[gc] = fit_llm(LLMTrainConfig(max_steps=3, micro_batch_size=4, lr=5e-3, gradient_checkpointing=gc,
                                          mixed_precision="bf16", monitor_every=0), student, varied_rows(16, 0),
                           varied_rows(4, 1), collate, tmp_path / f"run{gc}", teacher=gpt(1, 3), progress=False)
        assert student.get_base_model().is_activation_checkpointing == gc
    assert runs[True]["epochs"][-1]["val_loss"] == pytest.approx(runs[False]["epochs"][-1]["val_loss"], rel=1e-6)


# ------------------------------------------------------------------------------ the new fields in the configuration
NEW_BAD_CONFIGS = [
    (dict(max_steps=0), "max_steps"), (dict(max_steps=2.0), "max_steps"), (dict(max_steps=True), "max_steps"),
    (dict(eval_every=-1), "eval_every"), (dict(eval_every=1.5), "eval_every"), (dict(save_every=-2), "save_every"),
    (dict(mixed_precision="fp8"), "mixed_precision"), (dict(mixed_precision=True), "mixed_precision"),
    (dict(mixed_precision="bfloat16"), "mixed_precision"), (dict(gradient_checkpointing=1), "gradient_checkpointing"),
]


@pytest.mark.parametrize("kwargs,name", NEW_BAD_CONFIGS, ids=[repr(k) for k, _ in NEW_BAD_CONFIGS])
def test_new_fields_bad_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be (None|an int|one of|True or False)"):
        LLMTrainConfig(**kwargs)


def test_new_fields_in_the_configuration_and_older_checkpoints(tmp_path):
    "The new fields (defaults keep the epoch-based run) are part of to_dict, so a checkpoint of an older config is refused."
    new = dict(max_steps=None, eval_every=0, save_every=0, mixed_precision="no", gradient_checkpointing=False)
    d = LLMTrainConfig().to_dict()
    assert {k: d[k] for k in new} == new
    assert set(T.FIELD_CHECKS) >= set(new)
    cfg = LLMTrainConfig(mode="sft", epochs=1, micro_batch_size=4)
    fit_llm(cfg, gpt(0), rows(4, 0), None, collate, tmp_path, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    saved["config"] = {k: v for k, v in saved["config"].items() if k not in new}          # as an older version wrote
    torch.save(saved, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="belongs to another configuration"):
        fit_llm(cfg, gpt(0), rows(4, 0), None, collate, tmp_path, progress=False)
