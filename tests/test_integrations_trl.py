"""abkd.integrations.trl: the AB divergence (and the zoo) inside TRL's GKDTrainer and DistillationTrainer.

Hooks are checked against TRL's own divergence at the points where both compute the same thing, and against the
independent mpmath reference (tests/reference.py); the trainers run a few steps on tiny local GPT-2s, on-policy
generation included."""
import math
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)

from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl import DistillationConfig
from trl.experimental.gkd import GKDConfig, GKDTrainer

from abkd.integrations.trl import (ABDistillationTrainer, ABGKDTrainer, TokenDivergence, divergence_params,
                                   trl_distillation)
from abkd.llm.data import train_bpe_tokenizer
from reference import closed_form_gradient, ref_ab_divergence, ref_ab_gradient, to_float64

TRL_DIVERGENCE = trl_distillation._chunked_divergence_loss            # TRL's own, before any trainer ran


# ---------------------------------------------------------------------------------------------------------------
# the hooks on fixed tensors
# ---------------------------------------------------------------------------------------------------------------
def _holder(loss="ab", **params):
    h = type("Holder", (), {})()
    h.divergence = TokenDivergence(loss, divergence_params(loss, **params))
    return h


def gkd_hook(loss="ab", **params):
    h = _holder(loss, **params)
    return lambda *a, **kw: ABGKDTrainer.generalized_jsd_loss(h, *a, **kw)


def distillation_hook(loss="ab", **params):
    h = _holder(loss, **params)
    return lambda *a, **kw: ABDistillationTrainer.hidden_divergence(h, *a, **kw)


def logits_and_labels(seed=0, B=3, L=7, V=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(B, L, V, generator=g, dtype=dtype)
    t = 2 * torch.randn(B, L, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :3] = -100                       # the prompt
    labels[1, 5:] = -100                       # padding / after EOS
    return s, t, labels


@pytest.mark.parametrize("n_items", [None, 17])
@pytest.mark.parametrize("ab, trl_beta", [((1.0, 0.0), 0.0), ((0.0, 1.0), 1.0)])
def test_gkd_hook_is_trl_kl_at_the_ends(ab, trl_beta, n_items):
    s, t, labels = logits_and_labels()
    n = None if n_items is None else torch.tensor(n_items)
    ours = gkd_hook(ab_alpha=ab[0], ab_beta=ab[1])(s, t, labels, num_items_in_batch=n)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=trl_beta, num_items_in_batch=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("jsd_beta", [0.1, 0.5, 0.9])
def test_gkd_hook_zoo_js_is_trl_generalized_jsd(jsd_beta):
    s, t, labels = logits_and_labels(2)
    ours = gkd_hook("js", loss_params=dict(beta=jsd_beta))(s, t, labels)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=jsd_beta)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)


@pytest.mark.parametrize("alpha, beta", [(0.2, 0.7), (0.5, 0.5), (1.5, -0.3), (0.0, 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gkd_hook_value_and_gradient_match_reference(alpha, beta, temperature):
    s, t, labels = logits_and_labels(1, B=2, L=5, V=7)
    keep = labels != -100
    x = s.clone().requires_grad_()
    n = torch.tensor(9)
    loss = gkd_hook(ab_alpha=alpha, ab_beta=beta)(x, t, labels, temperature=temperature, num_items_in_batch=n)
    ref = to_float64(ref_ab_divergence(s[keep], t[keep], alpha, beta, temperature=temperature)).sum() / 9
    assert abs(loss.item() - ref) <= 1e-10 * max(ref, 1.0)
    grad, = torch.autograd.grad(loss, x)
    ref_grad = torch.zeros_like(s)
    ref_grad[keep] = torch.from_numpy(ref_ab_gradient(s[keep], t[keep], alpha, beta, temperature=temperature)) / 9
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
    assert grad[~keep].abs().max() == 0                          # prompt and padding positions get no gradient


def test_gkd_hook_float32_paper_point_and_reductions():
    s, t, labels = logits_and_labels(3)
    keep = labels != -100
    ref = to_float64(ref_ab_divergence(s[keep], t[keep], 0.2, 0.7)).sum()
    hook = gkd_hook()                                            # the default: the paper's (0.2, 0.7)
    mean = hook(s.float(), t.float(), labels).item()
    total = hook(s.float(), t.float(), labels, reduction="sum").item()
    assert abs(mean - ref / keep.sum().item()) <= 1e-6 * ref
    assert abs(total - ref) <= 1e-6 * ref
    empty = torch.full_like(labels, -100)
    x = s.clone().requires_grad_()
    out = hook(x, t, empty)                                      # nothing kept: 0 with a gradient path, as TRL
    assert out.item() == 0 and out.requires_grad
    with pytest.raises(ValueError, match="reduction must be 'batchmean' or 'sum'"):
        hook(s, t, labels, reduction="mean")


def hidden_inputs(seed=0, B=2, K=5, H=8, Ht=6, V=13, softcap=3.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[1, 3:] = 0
    extras = dict(student_lm_head_bias=r(V), teacher_lm_head_bias=r(V), student_logit_scale=0.7,
                  teacher_logit_scale=1.3, student_final_logit_softcapping=softcap,
                  teacher_final_logit_softcapping=None, temperature=1.5)
    return (r(B, K, H).requires_grad_(), r(B, K, Ht), r(V, H).requires_grad_(), r(V, Ht), mask), extras


@pytest.mark.parametrize("case", ["fkl-end", "rkl-end", "js"])
@pytest.mark.parametrize("n_items", [None, 12.0])
def test_distillation_hook_is_trl_chunked_divergence(case, n_items):
    (hs, ht, ws, wt, mask), extras = hidden_inputs()
    hook, trl_beta = {"fkl-end": (distillation_hook(ab_alpha=1.0, ab_beta=0.0), 0.0),
                      "rkl-end": (distillation_hook(ab_alpha=0.0, ab_beta=1.0), 1.0),
                      "js": (distillation_hook("js", loss_params=dict(beta=0.3)), 0.3)}[case]
    n = None if n_items is None else torch.tensor(n_items)
    ours = hook(hs, ht, ws, wt, mask, None, n, **extras)
    theirs = trl_distillation._chunked_divergence_loss(hs, ht, ws, wt, mask, trl_beta, n, **extras)
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=2e-6, atol=1e-5)    # the entropy TRL logs
    assert int(ours[2]) == int(theirs[2]) == 8
    for a, b in zip(torch.autograd.grad(ours[0], (hs, ws)), torch.autograd.grad(theirs[0], (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_distillation_hook_matches_reference():
    (hs, ht, ws, wt, mask), extras = hidden_inputs(4, softcap=None)
    extras["student_final_logit_softcapping"] = 2.5
    keep = mask.reshape(-1) != 0
    zs = (0.7 * (hs.detach().reshape(-1, 8)[keep].double() @ ws.detach().double().T
                 + extras["student_lm_head_bias"].double()))
    zs = 2.5 * torch.tanh(zs / 2.5)
    zt = 1.3 * (ht.reshape(-1, 6)[keep].double() @ wt.double().T + extras["teacher_lm_head_bias"].double())
    loss, entropy_sum, n = distillation_hook(ab_alpha=0.2, ab_beta=0.7)(hs, ht, ws, wt, mask, None, None, **extras)
    ref = to_float64(ref_ab_divergence(zs, zt, 0.2, 0.7, temperature=1.5)).sum() / keep.sum().item()
    assert abs(loss.item() - ref) <= 2e-6 * ref
    lq = torch.log_softmax(zs / 1.5, -1)
    assert abs(entropy_sum.item() + (lq.exp() * lq).sum().item()) <= 1e-5
    # the gradient w.r.t. the student's logits, through the float64 closed form, chained to the hidden states
    x = hs.detach().double().requires_grad_()
    z = 0.7 * (x.reshape(-1, 8)[keep] @ ws.detach().double().T + extras["student_lm_head_bias"].double())
    z = 2.5 * torch.tanh(z / 2.5)
    g_z = torch.from_numpy(closed_form_gradient(zs, zt, 0.2, 0.7, temperature=1.5)) / keep.sum().item()
    ref_gh, = torch.autograd.grad(z, x, grad_outputs=g_z)
    gh, = torch.autograd.grad(loss, hs)
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-4, atol=1e-7)


def test_distillation_swap_is_scoped_and_checked(monkeypatch):
    trainer = object.__new__(ABDistillationTrainer)
    trainer.divergence = TokenDivergence("ab", divergence_params())
    seen = []
    monkeypatch.setattr(trl_distillation.DistillationTrainer, "_compute_loss",
                        lambda self, *a: seen.append(trl_distillation._chunked_divergence_loss) or "no divergence")
    with pytest.raises(RuntimeError, match="did not call _chunked_divergence_loss"):
        trainer._compute_loss(None, {}, None)
    assert seen[0] is not TRL_DIVERGENCE and trl_distillation._chunked_divergence_loss is TRL_DIVERGENCE


# ---------------------------------------------------------------------------------------------------------------
# the trainers on tiny models
# ---------------------------------------------------------------------------------------------------------------
WORDS = "the cat sat on a mat and the dog ran to the red ball while birds sang in the old tree".split()
TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tok = train_bpe_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300, min_frequency=1)
    tok.padding_side = "left"
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


def gpt2(tok, seed, vocab=None):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab or len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))


def chats(lengths=(24,)):
    return Dataset.from_list([{"messages": [{"role": "user", "content": t[:16]},
                                            {"role": "assistant", "content": t[16:16 + lengths[i % len(lengths)]]}]}
                              for i, t in enumerate(TEXTS[:8])])


def prompts():
    return Dataset.from_list([{"prompt": t[:16]} for t in TEXTS[:8]])


def common(tmp_path, name, **kw):
    return dict(dict(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True), **kw)


def gkd_trainer(tok, tmp_path, name, loss="ab", teacher=None, train=None, **config):
    ab = dict(ab_alpha=0.2, ab_beta=0.7) if loss == "ab" else {}
    args = GKDConfig(**common(tmp_path, name, **dict(dict(max_new_tokens=6, max_length=64), **config)))
    return ABGKDTrainer(model=gpt2(tok, 0), teacher_model=teacher or gpt2(tok, 1), args=args, processing_class=tok,
                        train_dataset=train or chats(), loss=loss, **ab)


def distillation_trainer(tok, tmp_path, name, train=None, **config):
    args = DistillationConfig(**common(tmp_path, name, **dict(dict(max_completion_length=6, bf16=False,
                                                                   gradient_checkpointing=False), **config)))
    return ABDistillationTrainer(model=gpt2(tok, 0), teacher_model=gpt2(tok, 1), args=args, processing_class=tok,
                                 train_dataset=train or prompts(), ab_alpha=0.2, ab_beta=0.7)


def spy_generation(trainer):
    "Record which model generates each on-policy batch."
    who = []
    original = trainer.generate_on_policy_outputs
    def spy(model, inputs, config):
        who.append("teacher" if model is trainer.teacher_model else "student")
        return original(model, inputs, config)
    trainer.generate_on_policy_outputs = spy
    return who


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def changed(before, model):
    return sum(not torch.equal(before[k], v) for k, v in model.named_parameters())


def train_and_check(trainer):
    student, teacher = snapshot(trainer.model), snapshot(trainer.teacher_model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert changed(student, trainer.model) > 0
    assert changed(teacher, trainer.teacher_model) == 0                 # the teacher is a constant
    assert trainer.divergence.calls >= 3
    return losses


@pytest.mark.timeout(300)
def test_gkd_on_policy_student_generation(tok, tmp_path):
    trainer = gkd_trainer(tok, tmp_path, "gkd", lmbda=1.0)
    who = spy_generation(trainer)
    train_and_check(trainer)
    assert who == ["student"] * 3


@pytest.mark.timeout(300)
def test_gkd_seq_kd_teacher_generation_with_a_zoo_loss(tok, tmp_path):
    trainer = gkd_trainer(tok, tmp_path, "seqkd", loss="srkl", lmbda=0.0, seq_kd=True)
    who = spy_generation(trainer)
    train_and_check(trainer)
    assert who == ["teacher"] * 3
    assert trainer.divergence.loss == "srkl"


@pytest.mark.timeout(300)
def test_distillation_on_policy(tok, tmp_path):
    trainer = distillation_trainer(tok, tmp_path, "opd")
    train_and_check(trainer)
    logged = [h for h in trainer.state.log_history if "entropy" in h]
    assert logged and all(math.isfinite(h["entropy"]) and h["entropy"] > 0 for h in logged)
    assert logged[0]["completions/mean_length"] > 0                    # completions were generated
    assert trl_distillation._chunked_divergence_loss is TRL_DIVERGENCE   # the swap lasted only for the call


def one_sgd_step(trainer):
    before = snapshot(trainer.model)
    trainer.train()
    return torch.cat([(v.detach() - before[k]).flatten() for k, v in trainer.model.named_parameters()])


def same_update(a, b):
    "Equal up to float32 summation order (a few cancelling bias sums); a doubled or halved step fails."
    scale = a.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2 * scale)
    assert abs((b.norm() / a.norm()).item() - 1) < 1e-4


def unpadded_examples(tok, n=4, length=12):
    "Token windows of one length (no padding, so both batchings see identical positions), split prompt/completion"
    " at different points: different loss-token counts per example."
    ids = tok(" ".join(TEXTS))["input_ids"]
    rows = []
    for i in range(n):
        window, k = ids[i * length:(i + 1) * length], 2 + 3 * i                 # prompt lengths 2, 5, 8, 11
        rows.append({"prompt": tok.decode(window[:k]), "input_ids": window, "completion_mask": [0] * k + [1] * (length - k)})
    return Dataset.from_list(rows)


def equal_length_prompts(tok, n=4):
    "Prompts of one token length, so left padding is the same in both batchings."
    pool = [" ".join(t.split()[:4]) for t in TEXTS]
    lengths = [len(tok(p)["input_ids"]) for p in pool]
    common_length = max(set(lengths), key=lengths.count)
    chosen = [p for p, l in zip(pool, lengths) if l == common_length][:n]
    assert len(chosen) == n, (lengths, n)
    return Dataset.from_list([{"prompt": p} for p in chosen])


@pytest.mark.timeout(300)
def test_gradient_accumulation_gives_the_same_update(tok, tmp_path):
    "4 × 1 and 2 × 2 give one update: the hooks divide by the step's token count, not per micro-batch."
    gkd = [one_sgd_step(gkd_trainer(tok, tmp_path, f"gkd{b}", train=unpadded_examples(tok), lmbda=0.0, max_steps=1,
                                    optim="sgd", per_device_train_batch_size=b, gradient_accumulation_steps=4 // b))
           for b in (4, 2)]
    same_update(*gkd)
    opd = [one_sgd_step(distillation_trainer(tok, tmp_path, f"opd{b}", train=equal_length_prompts(tok), max_steps=1,
                                             optim="sgd", per_device_train_batch_size=b,
                                             gradient_accumulation_steps=4 // b))
           for b in (4, 2)]
    same_update(*opd)


# ---------------------------------------------------------------------------------------------------------------
# bad input: named arguments, the fix in the message, before TRL builds anything
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss="klx"), ValueError, "unknown loss 'klx'; available: fkl"),
    (dict(ab_alpha=float("nan")), ValueError, "ab_alpha must be finite"),
    (dict(ab_beta="0.7"), TypeError, "ab_beta must be a real number"),
    (dict(loss_params=dict(beta=0.7)), ValueError, r"loss_params\['beta'\] is ambiguous.*pass ab_beta="),
    (dict(loss="rkl", ab_beta=0.7), ValueError, "ab_beta=0.7 applies to loss='ab' only"),
    (dict(loss="sfkl", loss_params=dict(lam=2.0)), ValueError, "lam must be in"),
    (dict(loss="sfkl", loss_params=dict(mu=0.1)), ValueError, "unknown parameter.*'mu'.*valid: lam"),
])
def test_bad_divergence_arguments(tok, tmp_path, kwargs, error, match):
    args = GKDConfig(**common(tmp_path, "bad"))
    with pytest.raises(error, match=match):
        ABGKDTrainer(model=gpt2(tok, 0), teacher_model=gpt2(tok, 1), args=args, processing_class=tok,
                     train_dataset=chats(), **kwargs)


@pytest.mark.parametrize("config, trainer", [(GKDConfig, ABGKDTrainer), (DistillationConfig, ABDistillationTrainer)])
def test_trl_beta_is_refused(tok, tmp_path, config, trainer):
    args = config(**common(tmp_path, "beta", beta=0.7, **({"bf16": False} if config is DistillationConfig else {})))
    with pytest.raises(ValueError, match=rf"{config.__name__}.beta=0.7 is TRL's generalized-JSD interpolation.*"
                                         r"pass ab_beta=0.7"):
        trainer(gpt2(tok, 0), gpt2(tok, 1), args, train_dataset=chats(), processing_class=tok)


def test_vocab_mismatch_is_refused(tok, tmp_path):
    args = DistillationConfig(**common(tmp_path, "vocab", bf16=False))
    with pytest.raises(ValueError, match=r"teacher_model has vocab_size 310 but model \(the student\) has vocab_size "
                                         r"300.*resize_token_embeddings\(310\)"):
        ABDistillationTrainer(model=gpt2(tok, 0), teacher_model=gpt2(tok, 1, vocab=310), args=args,
                              processing_class=tok, train_dataset=prompts())
    s, t = torch.randn(2, 3, 300), torch.randn(2, 3, 310)                 # logits that still differ at the hook
    with pytest.raises(ValueError, match="vocabulary sizes differ: student_logits has V=300, teacher_logits has V=310"):
        gkd_hook()(s, t, torch.zeros(2, 3, dtype=torch.long))
