"""ABKDTrainer (abkd.integrations.transformers): the step normalisation under gradient accumulation and data
parallelism, the fused path under bf16 autocast, evaluation metrics and the monitor, against float64 references
(tests/loss_reference.py) and against controls that show each check can fail."""
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import loss_reference as ref
from abkd.integrations.transformers import ABKDTrainer, freeze_teacher
from abkd.llm.train import monitor_rows

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]


def tiny_lm(seed, vocab=100, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype)


def rows(n=12, L=10, seed=0, vocab=100):
    "Pre-padded examples with different numbers of loss tokens (a random prompt and padding carry label -100)."
    g, out = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        ids = torch.randint(1, vocab, (L,), generator=g)
        prompt = int(torch.randint(1, L - 2, (), generator=g))
        end = int(torch.randint(prompt + 2, L + 1, (), generator=g))
        labels = ids.clone(); labels[:prompt] = -100; labels[end:] = -100
        out.append(dict(input_ids=ids, attention_mask=(torch.arange(L) < end).long(), labels=labels))
    return out


def make_args(d, **kw):
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=3, optim="sgd",
                learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=1e9, logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    return TrainingArguments(d, **{**base, **kw})


def train(cls=ABKDTrainer, data=None, student=None, teacher=None, dtype=torch.float64, args=None, callbacks=None, **kw):
    "(flattened student parameters, grad norms, trainer) after training on `data` (rows() by default)."
    student = tiny_lm(0, dtype=dtype) if student is None else student
    teacher = tiny_lm(1, dtype=dtype) if teacher is None else teacher
    with tempfile.TemporaryDirectory() as d:
        tr = cls(model=student, teacher_model=teacher, args=make_args(d, **(args or {})),
                 train_dataset=rows() if data is None else data, callbacks=callbacks, **kw)
        tr.remove_callback(transformers.trainer_callback.PrinterCallback)
        tr.train()
    norms = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    return torch.cat([p.detach().flatten() for p in student.parameters()]), norms, tr


class MicroBatchMean(ABKDTrainer):
    "The obvious override: each micro-batch's own token mean, Trainer left to decide the scaling (the reported bug)."
    loss_is_scaled_for_ga = None
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.token_sums(model, inputs)
        return s["kd"] / s["n"].clamp_min(1)


class MicroBatchMeanOverSteps(MicroBatchMean):
    "The per-micro-batch mean divided by the accumulation steps: right only when micro-batches hold equal tokens."
    loss_is_scaled_for_ga = False


def test_accumulation_equivalence_float64():
    """Batch 4 × accumulation 1 and batch 2 × accumulation 2 give the same parameters after 3 SGD steps and the same
    grad norms. float64, so the one difference (the order in which two partial gradients are added) is ~1e-16
    relative; 1e-12 leaves room for 3 steps and is 1e9 times below the controls' gaps."""
    counts = {int((r["labels"][1:] != -100).sum()) for r in rows()}
    assert len(counts) > 1                                       # examples carry different numbers of loss tokens
    a, na, _ = train(args=dict(per_device_train_batch_size=4, gradient_accumulation_steps=1))
    b, nb, _ = train(args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert float((a - b).abs().max()) < 1e-12
    np.testing.assert_allclose(nb, na, rtol=1e-12)
    # control 1, the reported bug: the gradient doubles at accumulation 2 (grad norm x ~2) and the parameters move off
    c, nc, _ = train(MicroBatchMean, args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert 1.8 < nc[0] / na[0] < 2.2 and float((a - c).abs().max()) > 1e-3
    # control 2, divided by the accumulation steps: a mean of means weights tokens by their micro-batch's size
    e, ne, _ = train(MicroBatchMeanOverSteps, args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert abs(ne[0] / na[0] - 1) > 1e-3 and float((a - e).abs().max()) > 1e-6


def test_accumulation_equivalence_adamw():
    "The same under the default AdamW (which would hide a uniformly doubled gradient, hence SGD above)."
    kw = dict(optim="adamw_torch", learning_rate=1e-2, max_steps=2)
    a, _, _ = train(args=dict(kw, per_device_train_batch_size=4, gradient_accumulation_steps=1))
    b, _, _ = train(args=dict(kw, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert float((a - b).abs().max()) < 1e-12


def reference_sums(student, teacher, data, token_fn):
    "(Σ token_fn(p, q, y) over the loss tokens, Σ −log q(y), Σ [argmax q = argmax p], N) in numpy float64."
    kd = ce = agree = n = 0.0
    with torch.no_grad():
        for r in data:
            ids, att = r["input_ids"][None], r["attention_mask"][None]
            s, t = student(ids, attention_mask=att).logits[0, :-1], teacher(ids, attention_mask=att).logits[0, :-1]
            keep = (r["labels"][1:] != -100).numpy()
            y = r["labels"][1:].numpy()[keep]
            p, q = ref.softmax(t)[keep], ref.softmax(s)[keep]
            kd += float(token_fn(p, q).sum()); ce += float(-np.log(q[np.arange(len(y)), y]).sum())
            agree += float((q.argmax(-1) == p.argmax(-1)).sum()); n += float(keep.sum())
    return kd, ce, agree, n


@pytest.mark.parametrize("loss,loss_params,ce_weight,token_fn", [
    ("ab", None, 0.0, lambda p, q: ref.ab(p, q, 0.2, 0.7)),
    ("js", {"beta": 0.3}, 0.25, lambda p, q: ref.js(p, q, 0.3)),
])
def test_step_loss_matches_reference(loss, loss_params, ce_weight, token_fn):
    """The logged loss of a step (batch 2 × accumulation 2 over the 4 examples) is (Σ D + ce_weight Σ CE) / N over
    its loss tokens, computed before the update: float64 reference to 1e-6 relative (Trainer adds the logged loss up
    in a float32 tensor; a wrong normalisation is off by 10-100%)."""
    data = rows(n=4)
    student, teacher = tiny_lm(0), tiny_lm(1)
    kd, ce, _, n = reference_sums(student, teacher, data, token_fn)
    _, _, tr = train(data=data, student=student, teacher=teacher, loss=loss, loss_params=loss_params,
                     ce_weight=ce_weight, args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                    max_steps=1))
    logged = tr.state.log_history[0]["loss"]
    assert math.isclose(logged, (kd + ce_weight * ce) / n, rel_tol=1e-6)


def test_fused_matches_logits_path():
    "fused=True and fused=False: the same parameters after 2 SGD steps (float64, 1e-10) and the same step losses."
    a, na, ta = train(fused=False, args=dict(max_steps=2))
    b, nb, tb = train(fused=True, args=dict(max_steps=2))
    assert float((a - b).abs().max()) < 1e-10
    np.testing.assert_allclose(nb, na, rtol=1e-9)
    # the head counts as a module: a bias on the output layer reaches the loss and gets its gradient in both paths
    def with_head_bias():
        m = tiny_lm(0)
        m.lm_head = torch.nn.Linear(32, 100, bias=True).double()
        with torch.no_grad(): m.lm_head.weight.copy_(m.transformer.wte.weight); m.lm_head.bias.uniform_(-1, 1)
        return m
    sa, sb = with_head_bias(), with_head_bias()
    train(student=sa, fused=False, args=dict(max_steps=2)); train(student=sb, fused=True, args=dict(max_steps=2))
    assert float((sa.lm_head.bias - sb.lm_head.bias).detach().abs().max()) < 1e-10
    assert float((sa.lm_head.bias - with_head_bias().lm_head.bias).detach().abs().max()) > 1e-4   # the bias was trained


def test_fused_counts_lora_on_the_head():
    """A PEFT student with LoRA on the attention and on lm_head: the fused path (head as a module) trains the same
    adapters as the logits path (float64, 1e-12), and the head's adapters do move."""
    import warnings
    from peft import LoraConfig, get_peft_model
    def lora_student():
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")               # fan_in_fan_out is reset for lm_head, an nn.Linear
            return get_peft_model(tiny_lm(0), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"],
                                                         init_lora_weights=False, fan_in_fan_out=True))
    def adapters(m): return {k: v.detach().clone() for k, v in m.named_parameters() if "lora_" in k}
    init, out = adapters(lora_student()), {}
    for fused in (False, True):
        m = lora_student()
        train(student=m, fused=fused, args=dict(max_steps=2))
        out[fused] = adapters(m)
    assert any("lm_head" in k for k in init)
    assert max(float((out[True][k] - out[False][k]).abs().max()) for k in init) < 1e-12
    assert min(float((out[True][k] - init[k]).abs().max()) for k in init if "lm_head" in k) > 1e-3


def test_fused_keeps_bf16_autocast():
    """TrainingArguments(bf16=True): in a fused step the body's matmul (MLP input projection) and the output layer
    (the model's last position and the loss's chunks) return bf16; the body called directly (the get_decoder()
    shortcut) returns float32 (the control); the fused step loss agrees with the logits path to bf16 tolerance."""
    seen, direct, losses = {"body": [], "head": []}, [], {}
    for fused in (True, False):
        student, teacher = tiny_lm(0, dtype=torch.float32), tiny_lm(1, dtype=torch.float32)
        hooks = [student.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen["body"].append(o.dtype)),
                 student.lm_head.register_forward_hook(lambda m, i, o: seen["head"].append(o.dtype))] if fused else []
        _, _, tr = train(student=student, teacher=teacher, fused=fused,
                         args=dict(max_steps=1, bf16=True, optim="adamw_torch", learning_rate=1e-4))
        for h in hooks: h.remove()
        losses[fused] = tr.state.log_history[0]["loss"]
        if fused:
            h = student.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: direct.append(o.dtype))
            student.get_decoder()(rows()[0]["input_ids"][None]); h.remove()
    assert seen["body"] and set(seen["body"]) == {torch.bfloat16}
    assert len(seen["head"]) >= 2 and set(seen["head"]) == {torch.bfloat16}   # forward's last position + loss chunks
    assert direct == [torch.float32]
    assert math.isclose(losses[True], losses[False], rel_tol=2e-2)
    # and without bf16 the same hooks see float32 (the dtype check can fail)
    student = tiny_lm(0, dtype=torch.float32); fp32 = []
    h = student.lm_head.register_forward_hook(lambda m, i, o: fp32.append(o.dtype))
    train(student=student, teacher=tiny_lm(1, dtype=torch.float32), fused=True, args=dict(max_steps=1)); h.remove()
    assert set(fp32) == {torch.float32}


@pytest.mark.parametrize("fused", [False, True])
def test_evaluate_token_weighted_metrics(fused):
    """evaluate(): eval_kd_loss, eval_ce, eval_perplexity, eval_top1_agreement, eval_loss_tokens and eval_loss over the
    loss tokens of 7 examples in batches of 3 (unequal batches and tokens) equal the float64 reference."""
    data = rows(n=7, seed=3)
    student, teacher = tiny_lm(0), tiny_lm(1)
    kd, ce, agree, n = reference_sums(student, teacher, data, lambda p, q: ref.ab(p, q, 0.2, 0.7))
    with tempfile.TemporaryDirectory() as d:
        tr = ABKDTrainer(model=student, teacher_model=teacher, args=make_args(d, per_device_eval_batch_size=3),
                         eval_dataset=data, ce_weight=0.0 if fused else 0.5, fused=fused)
        m = tr.evaluate()
        other = tr.evaluate(metric_key_prefix="test")
    w = 0.0 if fused else 0.5
    assert m["eval_loss_tokens"] == n
    assert math.isclose(m["eval_kd_loss"], kd / n, rel_tol=1e-10)
    assert math.isclose(m["eval_ce"], ce / n, rel_tol=1e-10)
    assert math.isclose(m["eval_perplexity"], math.exp(ce / n), rel_tol=1e-10)
    assert math.isclose(m["eval_top1_agreement"], agree / n, rel_tol=1e-12) and 0 < agree < n
    assert math.isclose(m["eval_loss"], (kd + w * ce) / n, rel_tol=1e-10)
    assert math.isclose(other["test_kd_loss"], kd / n, rel_tol=1e-10)


class Recorder(TrainerCallback):
    "What a reporting callback (TensorBoard, W&B) receives through on_log."
    def __init__(self): self.logs = []
    def on_log(self, args, state, control, logs=None, **kw): self.logs.append((state.global_step, dict(logs)))


def test_monitor_logs_through_callbacks():
    """monitor_every=2 over 5 steps: the concentration statistics reach every callback's on_log at steps 0, 2, 4, on
    monitor_positions=7 loss positions; the chosen positions are abkd.llm.train.monitor_rows' draw."""
    rec = Recorder()
    _, _, tr = train(callbacks=[rec], monitor_every=2, monitor_positions=7, args=dict(max_steps=5))
    mon = [(step, logs) for step, logs in rec.logs if "concentration/tv_error" in logs]
    assert [s for s, _ in mon] == [0, 2, 4]
    for _, logs in mon:
        assert logs["concentration/positions"] == 7
        assert all(math.isfinite(logs[f"concentration/{k}"]) for k in
                   ("student_target_mass", "teacher_target_mass", "entropy_gap", "tv_error", "update_topk_share"))
        assert 0 <= logs["concentration/tv_error"] <= 1
    none = Recorder()
    train(callbacks=[none], args=dict(max_steps=2))                    # monitor_every=0: nothing logged
    assert not any("concentration/tv_error" in logs for _, logs in none.logs)
    mask = torch.zeros(2, 9, dtype=torch.bool); mask[:, 3:] = True
    assert monitor_rows(mask, 7, 5).shape == (7, 2)                    # the helper it reuses draws 7 of 12


def test_bad_inputs():
    s, t = tiny_lm(0), tiny_lm(1)
    with tempfile.TemporaryDirectory() as d:
        args = make_args(d)
        def make(**kw):
            base = dict(model=s, teacher_model=t, args=args, train_dataset=rows())
            return ABKDTrainer(**{**base, **kw})
        with pytest.raises(ValueError, match="teacher_model="): make(teacher_model=None)
        with pytest.raises(ValueError, match="model="): make(model=None)
        with pytest.raises(ValueError, match=r"100 tokens and the teacher's 120.*vocab_policy"):
            make(teacher_model=tiny_lm(1, vocab=120))
        with pytest.raises(ValueError, match="fused=True needs one vocabulary"):
            make(teacher_model=tiny_lm(1, vocab=120), fused=True, loss_params={"vocab_policy": "pad"})
        with pytest.raises(ValueError, match="alpha"): make(alpha=float("nan"))
        with pytest.raises(TypeError, match="beta"): make(beta="0.7")
        with pytest.raises(ValueError, match="temperature"): make(temperature=0.0)
        with pytest.raises(ValueError, match=r"loss='ab'.*alpha=1, beta=0"): make(loss="fkl", fused=True)
        with pytest.raises(ValueError, match="ce_weight=0"): make(fused=True, ce_weight=0.5)
        with pytest.raises(ValueError, match="ce_weight"): make(ce_weight=-1.0)
        with pytest.raises(ValueError, match="unknown loss 'kl2'.*fkl"): make(loss="kl2")
        with pytest.raises(ValueError, match="compute_loss_func"): make(compute_loss_func=lambda *a, **k: 0)
        with pytest.raises(ValueError, match="monitor_every"): make(monitor_every=-1)
        with pytest.raises(ValueError, match="reduction"): make(loss_params={"reduction": "mean"})
        no_labels = [{k: v for k, v in r.items() if k != "labels"} for r in rows()]
        with pytest.raises(ValueError, match="'labels'"): make(train_dataset=no_labels).train()
    # a teacher that requires gradients is accepted and frozen: eval mode, no gradient, the student's dtype
    teacher = tiny_lm(1, dtype=torch.float32).train()
    _, _, tr = train(teacher=teacher, args=dict(max_steps=1))
    assert tr.teacher is teacher and not teacher.training
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.float64
    # the vocabulary policies of the zoo make a padded teacher vocabulary usable
    _, _, tr = train(teacher=tiny_lm(1, vocab=120), loss_params={"vocab_policy": "pad"}, args=dict(max_steps=1))
    assert math.isfinite(tr.state.log_history[0]["loss"])
    t2 = freeze_teacher(tiny_lm(2), torch.device("cpu"), torch.float32)
    assert next(t2.parameters()).dtype == torch.float32 and not t2.training


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch, transformers
    sys.path.insert(0, sys.argv[2])
    transformers.logging.set_verbosity_error()
    from test_integrations_transformers import train
    params, norms, tr = train(args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=3))
    torch.save(dict(params=params, norms=norms, world=tr.args.world_size, ddp=type(tr.model_wrapped).__name__,
                    teacher_wrapped=type(tr.teacher).__name__), f"{sys.argv[1]}/rank{tr.args.process_index}.pt")
''')


def test_ddp_two_cpu_processes_match_one_process():
    """torch.distributed.run with 2 CPU processes (gloo), batch 2 per process: both ranks end with identical student
    parameters, equal (float64, 1e-12) to one process on the same global batch of 4; the teacher is not DDP-wrapped."""
    one, n1, _ = train(args=dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=3))
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "ddp_run.py"; script.write_text(DDP_SCRIPT)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), d, str(Path(__file__).parent)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        ranks = [torch.load(Path(d) / f"rank{i}.pt") for i in range(2)]
    assert [x["world"] for x in ranks] == [2, 2] and ranks[0]["ddp"] == "DistributedDataParallel"
    assert ranks[0]["teacher_wrapped"] == "GPT2LMHeadModel"
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert float((ranks[0]["params"] - one).abs().max()) < 1e-12
    np.testing.assert_allclose(ranks[0]["norms"], n1, rtol=1e-12)
