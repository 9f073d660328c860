"""The LLM trainer: token normalisation under gradient accumulation, exact resume, student-generated outputs,
selection, and bad inputs — on tiny random GPT-2s."""
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from abkd.llm.train import (LLMTrainConfig, ReplayBuffer, fit_llm, make_kd_loss, micro_batch_loss, prompt_lengths,
                            update_gen_prob)


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
