"""The bad-input table: every public entry point of abkd against the inputs users get wrong.

Each row (`Case`) names an entry point and a case, holds a callable that makes the call, and says what must happen:
either an exception of a given type whose message matches a regex (naming the argument and the fix), or a documented
result (a value compared with `expected()`: exactly unless `tol` is given). `run_case` checks one row and returns the
line the notebook prints; `CASES` is the whole table (tests/test_bad_inputs.py runs it under pytest)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import re
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

import torch

import abkd
import abkd.cli
from abkd.cifar.train import TrainConfig
from abkd.clip.train import CLIPTrainConfig
from abkd.llm.train import LLMTrainConfig
from abkd.vision_losses import VISION_LOSSES, get_vision_loss


@dataclass(frozen=True)
class Case:
    "One row: `call()` must raise `error` with a message matching `match`, or return the documented `expected()`."
    entry: str
    case: str
    call: Callable[[], object]
    error: Optional[type] = None        # (or a tuple of types)
    match: str = ""
    expected: Optional[Callable[[], object]] = None
    note: str = ""                      # the documented result, in words
    tol: Optional[tuple] = None         # (rtol, atol) for a documented value; None: exact


# ---------------------------------------------------------------- comparing results
def same(got, exp, tol=None) -> bool:
    "Equal values (tensors, numbers, bools, tuples), exactly or within (rtol, atol)."
    if isinstance(exp, tuple):
        return isinstance(got, tuple) and len(got) == len(exp) and all(same(g, e, tol) for g, e in zip(got, exp))
    if isinstance(exp, bool) or isinstance(got, bool): return got is exp
    got_t = got.detach() if isinstance(got, torch.Tensor) else torch.as_tensor(got)
    exp_t = exp.detach() if isinstance(exp, torch.Tensor) else torch.as_tensor(exp)
    if got_t.shape != exp_t.shape or got_t.device != exp_t.device: return False
    got_t, exp_t = got_t.double(), exp_t.double()
    if tol is None: return bool(torch.equal(got_t, exp_t))
    return bool(torch.allclose(got_t, exp_t, rtol=tol[0], atol=tol[1]))


def describe(value) -> str:
    if isinstance(value, tuple): return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, torch.Tensor):
        if value.numel() == 1: return f"{value.item():.6g}"
        return f"tensor of shape {tuple(value.shape)}"
    return repr(value)


def one_line(text: str, width: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def error_name(error) -> str:
    return " or ".join(e.__name__ for e in error) if isinstance(error, tuple) else error.__name__


def run_case(c: Case) -> tuple[bool, str]:
    "(passed, the result as one line: the error type and message, or the value and what it documents)."
    try:
        got = c.call()
    except Exception as e:                                  # noqa: BLE001 -- every failure is a row result
        text = f"{type(e).__name__}: {one_line(e)}"
        if c.error is None: return False, f"unexpected {text}"
        if not isinstance(e, c.error): return False, f"expected {error_name(c.error)}, got {text}"
        if not re.search(c.match, str(e), re.S): return False, f"message does not match /{c.match}/: {text}"
        return True, text
    if c.error is not None: return False, f"expected {error_name(c.error)}, got a result: {describe(got)}"
    exp = c.expected()
    if not same(got, exp, c.tol): return False, f"got {describe(got)}, documented {describe(exp)} ({c.note})"
    return True, f"= {describe(got)} ({c.note})"


# ---------------------------------------------------------------- inputs
def randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone(); x.view(-1)[1] = value; return x


def meta_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def transposed_copy(x: torch.Tensor) -> torch.Tensor:
    "The values of x in a non-contiguous layout (the last two dims stored swapped)."
    y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not y.is_contiguous() and torch.equal(y, x)
    return y


def strided_copy(x: torch.Tensor) -> torch.Tensor:
    "The values of x as every other column of a wider tensor (a strided last dimension)."
    wide = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)
    y = wide[..., ::2]
    assert y.stride(-1) == 2 and torch.equal(y, x)
    return y


def expanded_copy(x: torch.Tensor) -> torch.Tensor:
    "x with the first row broadcast over the batch (stride 0): a view that expand() makes."
    return x[:1].expand_as(x)


def backward_sum(out: torch.Tensor) -> None:
    out.sum().backward()


GRAD_NOTE = "the value of the detached call, and the teacher receives a finite, nonzero gradient"


def teacher_gradient_result(fn: Callable, s: torch.Tensor, t: torch.Tensor) -> tuple:
    "(value, teacher got a finite nonzero gradient) of fn(s, t) with t a leaf that requires a gradient."
    t = t.clone().requires_grad_()
    out = fn(s, t)
    backward_sum(out)
    ok = t.grad is not None and bool(torch.isfinite(t.grad).all()) and float(t.grad.abs().sum()) > 0
    return out.detach(), ok


# ---------------------------------------------------------------- token-level entry points
@dataclass(frozen=True)
class TokenEntry:
    "An entry point over [..., V] logits: make(**options) returns f(student, teacher, mask=None)."
    name: str
    make: Callable[..., Callable]
    hyper: tuple = ()                  # its real hyperparameters (each gets NaN / inf / bool / str cases)
    vocab_match: str = r"vocabulary sizes.*pad"


def core_function(impl: str) -> Callable[..., Callable]:
    def make(alpha=0.2, beta=0.7, **options):
        return lambda s, t, mask=None: abkd.ab_divergence(s, t, alpha, beta, impl=impl, mask=mask, **options)
    return make


def core_module(alpha=0.2, beta=0.7, **options):
    module = abkd.ABDivergence(alpha, beta, **options)
    return lambda s, t, mask=None: module(s, t, mask=mask)


ZOO_PARAMS = dict(ab=dict(alpha=0.2, beta=0.7), alpha=dict(alpha=0.5))


def zoo_module(name: str) -> Callable[..., Callable]:
    def make(**options):
        loss = abkd.get_loss(name, **{**ZOO_PARAMS.get(name, {}), **options})
        return lambda s, t, mask=None: loss(s, t, mask=mask)
    return make


def triton_runs_here() -> bool:
    "Triton runs on CUDA, or on CPU tensors under its interpreter (set before abkd is imported)."
    if importlib.util.find_spec("triton") is None: return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def token_entries() -> list[TokenEntry]:
    impls = ["auto", "chunked", "reference"] + (["triton"] if triton_runs_here() else [])
    entries = [TokenEntry(f"ab_divergence(impl={i!r})", core_function(i), ("alpha", "beta")) for i in impls]
    entries.append(TokenEntry("ABDivergence", core_module, ("alpha", "beta")))
    for name in abkd.available():
        hyper = tuple(p for p, v in abkd.losses.LOSSES.defaults[name].items())
        entries.append(TokenEntry(f"get_loss({name!r})", zoo_module(name), hyper, vocab_match=r"vocabulary sizes.*vocab_policy"))
    return entries


def device_for(entry: TokenEntry) -> str:
    return "cuda" if "triton" in entry.name and torch.cuda.is_available() else "cpu"


def token_cases(e: TokenEntry) -> list[Case]:
    dev = device_for(e)
    B, L, V = 2, 3, 7
    s, t = randn(B, L, V, seed=1).to(dev), randn(B, L, V, seed=2).to(dev)
    f = e.make()
    cases = []
    def row(case, call, error=None, match="", expected=None, note="", tol=None):
        cases.append(Case(e.name, case, call, error, match, expected, note, tol))
    def value_of(**options): return lambda: e.make(**options)(s, t)

    # dtypes
    row("integer student logits", lambda: f(s.long(), t), TypeError, r"student_logits must have a floating dtype.*\.float\(\)")
    row("integer teacher logits", lambda: f(s, t.int()), TypeError, r"teacher_logits must have a floating dtype.*\.float\(\)")
    row("complex student logits", lambda: f(s.to(torch.complex64), t), TypeError,
        r"student_logits must have a floating dtype.*\.real")
    row("bool teacher logits", lambda: f(s, t > 0), TypeError, r"teacher_logits must have a floating dtype")
    row("student logits not a tensor (list)", lambda: f(s.tolist(), t), TypeError, r"student_logits must be a torch\.Tensor")
    # values
    row("NaN in student logits", lambda: f(with_value(s, math.nan), t), ValueError, r"student_logits contains NaN")
    row("+inf in teacher logits", lambda: f(s, with_value(t, math.inf)), ValueError, r"teacher_logits contains NaN or \+inf")
    row("NaN at a masked position (ignored)", lambda: f(with_value(s, math.nan), t, mask=mask_without_first(s)),
        expected=lambda: f(s, t, mask=mask_without_first(s)), note="masked positions are not read")
    # shapes
    row("leading shapes differ", lambda: f(s, t.reshape(L, B, V)), ValueError, r"same shape.*student_logits.*teacher_logits")
    row("vocabulary sizes differ", lambda: f(s, randn(B, L, V + 2, seed=3).to(dev)), ValueError, e.vocab_match)
    row("V = 1", lambda: f(s[..., :1], t[..., :1]), ValueError, r"student_logits has a vocabulary dimension of size 1.*V >= 2")
    row("V = 0", lambda: f(s[..., :0], t[..., :0]), ValueError, r"student_logits has an empty vocabulary dimension")
    row("0-d logits", lambda: f(s[0, 0, 0], t[0, 0, 0]), ValueError, r"student_logits must have a vocabulary dimension")
    # empty batch, all masked: documented 0
    row("empty batch, reduction='mean'", lambda: f(s[:0], t[:0]), expected=lambda: torch.tensor(0.0), note="documented: 0")
    row("empty batch, reduction='sum'", lambda: e.make(reduction="sum")(s[:0], t[:0]),
        expected=lambda: torch.tensor(0.0), note="documented: 0")
    row("empty batch, reduction='none'", lambda: e.make(reduction="none")(s[:0], t[:0]).cpu(),
        expected=lambda: torch.zeros(0, L), note="documented: the empty leading shape")
    no = torch.zeros(B, L, dtype=torch.bool, device=dev)
    row("all positions masked, reduction='mean'", lambda: f(s, t, mask=no), expected=lambda: torch.tensor(0.0),
        note="documented: 0 (mean over no kept position)")
    row("all positions masked, reduction='batchmean'", lambda: e.make(reduction="batchmean")(s, t, mask=no),
        expected=lambda: torch.tensor(0.0), note="documented: 0")
    row("all positions masked: backward gives a zero gradient", lambda: zero_grad_when_masked(f, s, t, no),
        expected=lambda: True, note="documented: differentiable, gradient 0")
    # the teacher-gradient rule
    tg = lambda: t.clone().requires_grad_()
    row("teacher requires a gradient", lambda: f(s, tg()), ValueError,
        r"teacher_logits requires a gradient.*torch\.no_grad\(\).*teacher_logits\.detach\(\).*teacher_grad=True")
    row("teacher requires a gradient, call under torch.no_grad()", lambda: no_grad_call(f, s, tg()),
        expected=lambda: f(s, t), note="nothing is differentiated: allowed")
    row("teacher_grad=True", lambda: teacher_gradient_result(e.make(teacher_grad=True), s, t),
        expected=lambda: (f(s, t), True), note=GRAD_NOTE)
    row("teacher_grad='yes'", lambda: e.make(teacher_grad="yes")(s, t), TypeError, r"teacher_grad must be True or False")
    # devices
    row("teacher on meta, student on cpu", lambda: f(s.cpu(), meta_like(t)), ValueError,
        r"teacher_logits is on the meta device.*materialize")
    row("both on meta", lambda: f(meta_like(s), meta_like(t)), ValueError,
        r"student_logits is on the meta device|needs CUDA logits, got logits on meta")
    row("mask on meta", lambda: f(s, t, mask=torch.ones(B, L, dtype=torch.bool, device="meta")), ValueError,
        r"mask is on meta.*mask\.to\(student_logits\.device\)")
    # layouts: the same value as the contiguous call
    row("non-contiguous student (transposed storage)", lambda: f(transposed_copy(s), t), expected=lambda: f(s, t),
        note="equal to the contiguous call")
    row("strided vocabulary (every other column)", lambda: f(s, strided_copy(t)), expected=lambda: f(s, t),
        note="equal to the contiguous call")
    row("teacher expanded over the batch", lambda: f(s, expanded_copy(t)),
        expected=lambda: f(s, expanded_copy(t).contiguous()), note="equal to the contiguous call")
    row("non-contiguous mask", lambda: f(s, t, mask=transposed_copy(mask_without_first(s))),
        expected=lambda: f(s, t, mask=mask_without_first(s)), note="equal to the contiguous call")
    # masks
    row("float mask", lambda: f(s, t, mask=torch.ones(B, L, device=dev)), ValueError,
        r"mask must be a bool tensor.*mask_from_labels")
    row("labels passed as mask", lambda: f(s, t, mask=torch.full((B, L), -100, device=dev)), ValueError,
        r"mask must be a bool tensor.*mask_from_labels")
    row("mask of the wrong shape", lambda: f(s, t, mask=torch.ones(B, L + 1, dtype=torch.bool, device=dev)), ValueError,
        r"mask must have the leading shape")
    # options
    for T in (0, -1.0, math.nan):
        row(f"temperature={T}", value_of(temperature=T), ValueError, r"temperature must be (> 0|finite)")
    row("reduction='avg'", value_of(reduction="avg"), ValueError, r"reduction must be one of")
    for h in e.hyper:
        for bad, err, pattern in ((math.nan, ValueError, "must be finite"), (math.inf, ValueError, "must be finite"),
                                  (True, TypeError, "must be a real number.*pass a float"),
                                  ("0.5", TypeError, "must be a real number.*pass a float")):
            row(f"{h}={bad!r}", value_of(**{h: bad}), err, rf"{h} {pattern}")
    return cases


def mask_without_first(x: torch.Tensor) -> torch.Tensor:
    m = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device); m.view(-1)[0] = False; return m


def no_grad_call(f, s, t):
    with torch.no_grad(): return f(s, t)


def zero_grad_when_masked(f, s, t, mask) -> bool:
    s = s.clone().requires_grad_()
    backward_sum(f(s, t, mask=mask))
    return s.grad is not None and bool((s.grad == 0).all())


# ---------------------------------------------------------------- vision losses
VISION_PARAMS = {name: dict(alpha=0.8, beta=0.3) for name in ("abkd", "abdkd", "ablsd", "abttm")}


def vision_cases(name: str) -> list[Case]:
    entry = f"get_vision_loss({name!r})"
    B, C = 4, 5
    s, t, y = randn(B, C, seed=4), randn(B, C, seed=5), torch.tensor([0, 3, 1, 4])
    params = VISION_PARAMS.get(name, {})
    def make(**options): return get_vision_loss(name, **{**params, **options})
    loss = make()
    f = lambda s_, t_, y_=y: loss(s_, t_, y_)
    cases = []
    def row(case, call, error=None, match="", expected=None, note="", tol=None):
        cases.append(Case(entry, case, call, error, match, expected, note, tol))
    row("integer student logits", lambda: f(s.long(), t), TypeError, r"student_logits must have a floating dtype.*\.float\(\)")
    row("complex teacher logits", lambda: f(s, t.to(torch.complex64)), TypeError, r"teacher_logits must have a floating dtype")
    row("NaN in student logits", lambda: f(with_value(s, math.nan), t), ValueError, r"student_logits must be finite")
    row("+inf in teacher logits", lambda: f(s, with_value(t, math.inf)), ValueError, r"teacher_logits must be finite")
    row("batch sizes differ", lambda: f(s, t[:3]), ValueError, r"same shape \[batch, classes\]")
    row("class counts differ", lambda: f(s, randn(B, C + 1, seed=6)), ValueError, r"same shape \[batch, classes\]")
    row("3-d logits", lambda: f(s[None], t[None]), ValueError, r"student_logits must be \[batch, classes\]")
    row("one class (C = 1)", lambda: f(s[:, :1], t[:, :1], torch.zeros(B, dtype=torch.long)), ValueError,
        r"at least 2 classes")
    row("empty batch", lambda: f(s[:0], t[:0], y[:0]), expected=lambda: torch.tensor(0.0), note="documented: 0")
    row("teacher requires a gradient", lambda: f(s, t.clone().requires_grad_()), ValueError,
        r"teacher_logits requires a gradient.*torch\.no_grad\(\).*detach\(\).*teacher_grad=True")
    row("teacher requires a gradient, call under torch.no_grad()",
        lambda: no_grad_call(lambda a, b: f(a, b), s, t.clone().requires_grad_()), expected=lambda: f(s, t),
        note="nothing is differentiated: allowed")
    row("teacher_grad=True", lambda: teacher_gradient_result(lambda a, b: make(teacher_grad=True)(a, b, y), s, t),
        expected=lambda: (f(s, t), True), note=GRAD_NOTE)
    row("teacher on meta, student on cpu", lambda: f(s, meta_like(t)), ValueError, r"teacher_logits is on the meta device")
    row("non-contiguous student (transposed storage)", lambda: f(transposed_copy(s), t), expected=lambda: f(s, t),
        note="equal to the contiguous call")
    row("teacher expanded over the batch", lambda: f(s, expanded_copy(t)),
        expected=lambda: f(s, expanded_copy(t).contiguous()), note="equal to the contiguous call")
    row("reduction='avg'", lambda: make(reduction="avg"), ValueError, r"reduction must be one of")
    # labels, read by DKD/ABDKD and by `total` (the CE term) for every loss
    total = lambda y_: loss.total(s, t, y_)
    row("total(): float labels", lambda: total(y.float()), TypeError, r"labels must be integer class indices")
    row("total(): labels out of range", lambda: total(torch.tensor([0, 1, 2, 5])), ValueError, r"labels must be in \[0, 5\)")
    row("total(): labels of the wrong shape", lambda: total(y[:2]), ValueError, r"labels must have shape \(4,\)")
    row("total(): labels on meta", lambda: total(meta_like(y)), ValueError, r"labels is on meta.*labels\.to")
    row("total(): integer student logits", lambda: loss.total(s.long(), t, y), TypeError,
        r"student_logits must have a floating dtype")
    if VISION_LOSSES[name].takes("epoch") or name in ("dkd", "abdkd"):
        row("float labels", lambda: f(s, t, y.float()), TypeError, r"labels must be integer class indices")
        row("labels missing", lambda: f(s, t, None), TypeError, r"labels must be a torch\.Tensor")
    hyper = VISION_LOSSES.defaults[name]
    for h in hyper:
        if h == "ab_tckd":
            row("ab_tckd='yes'", lambda: make(ab_tckd="yes"), TypeError, r"ab_tckd must be True or False")
            continue
        for bad, err, pattern in ((math.nan, ValueError, "must be finite"), (True, TypeError, "must be a real number"),
                                  ("1", TypeError, "must be a real number")):
            row(f"{h}={bad!r}", lambda h=h, bad=bad: make(**{h: bad}), err, rf"{h} {pattern}")
        if h in ("temperature", "gamma"):
            row(f"{h}=0", lambda h=h: make(**{h: 0.0}), ValueError, rf"{h} must be > 0")
            row(f"{h}=-1", lambda h=h: make(**{h: -1.0}), ValueError, rf"{h} must be > 0")
    row("teacher_grad='yes'", lambda: make(teacher_grad="yes"), TypeError, r"teacher_grad must be True or False")
    row("kd_weight=-1", lambda: make(kd_weight=-1.0), ValueError, r"kd_weight must be in \[0, inf\]")
    return cases


# ---------------------------------------------------------------- the fused-linear front
def hidden_cases() -> list[Case]:
    entry = "ab_divergence_from_hidden"
    B, L, H, V = 2, 3, 8, 7
    h, w, t = randn(B, L, H, seed=7), randn(V, H, seed=8) / 3, randn(B, L, V, seed=9)
    def f(h_=h, w_=w, t_=t, alpha=0.2, beta=0.7, **kw):
        return abkd.ab_divergence_from_hidden(h_, w_, t_, alpha, beta, **kw)
    materialized = lambda **kw: abkd.ab_divergence(h @ w.T, t, 0.2, 0.7, **kw)
    cases = []
    def row(case, call, error=None, match="", expected=None, note="", tol=None):
        cases.append(Case(entry, case, call, error, match, expected, note, tol))
    row("integer student_hidden", lambda: f(h_=h.long()), TypeError, r"student_hidden must have a floating dtype")
    row("complex student_weight", lambda: f(w_=w.to(torch.complex64)), (TypeError, ValueError),
        r"student_(weight|head).*(floating dtype|same dtype)")
    row("integer teacher logits", lambda: f(t_=t.long()), TypeError, r"teacher.*floating dtype")
    row("NaN in student_hidden", lambda: f(h_=with_value(h, math.nan)), ValueError, r"(student|logits).*NaN")
    row("+inf in teacher logits", lambda: f(t_=with_value(t, math.inf)), ValueError, r"teacher.*(NaN|inf)")
    row("hidden size differs from the weight's", lambda: f(w_=w[:, :-1]), ValueError, r"student_(weight|head).*(H|hidden size)")
    row("vocabulary sizes differ (teacher V != weight rows)", lambda: f(t_=randn(B, L, V + 2, seed=10)), ValueError,
        r"teacher.*V=7")
    row("teacher positions differ", lambda: f(t_=t[:1]), ValueError, r"teacher.*positions")
    row("V = 1", lambda: f(w_=w[:1], t_=t[..., :1]), ValueError, r"vocabulary.*size 1|V >= 2")
    row("empty batch", lambda: f(h_=h[:0], t_=t[:0]), expected=lambda: torch.tensor(0.0), note="documented: 0")
    no = torch.zeros(B, L, dtype=torch.bool)
    row("all positions masked", lambda: f(mask=no), expected=lambda: torch.tensor(0.0), note="documented: 0")
    row("teacher logits require a gradient", lambda: f(t_=t.clone().requires_grad_()), ValueError,
        r"teacher.*gradient.*(no_grad|detach)")
    row("teacher (hidden, weight) requires a gradient",
        lambda: f(t_=(randn(B, L, 5, seed=11).requires_grad_(), randn(V, 5, seed=12))), ValueError,
        r"teacher.*gradient.*(no_grad|detach)")
    row("teacher logits on meta", lambda: f(t_=meta_like(t)), ValueError, r"meta")
    row("student_weight on meta", lambda: f(w_=meta_like(w)), ValueError, r"meta")
    row("non-contiguous student_hidden", lambda: f(h_=transposed_copy(h)), expected=lambda: f(),
        note="equal to the contiguous call")
    row("student_weight as a transposed view", lambda: f(w_=w.T.contiguous().T), expected=lambda: f(),
        note="equal to the contiguous call")
    row("teacher expanded over the batch", lambda: f(t_=expanded_copy(t)), expected=lambda: f(t_=expanded_copy(t).contiguous()),
        note="equal to the contiguous call")
    row("same value as the materialized logits", lambda: f(), expected=lambda: materialized(), tol=(1e-5, 1e-6),
        note="ab_divergence(hidden @ weight.T, teacher)")
    for a, err, pattern in ((math.nan, ValueError, "alpha must be finite"), (True, TypeError, "alpha must be a real number"),
                            ("0.2", TypeError, "alpha must be a real number")):
        row(f"alpha={a!r}", lambda a=a: f(alpha=a), err, pattern)
    row("temperature=0", lambda: f(temperature=0), ValueError, r"temperature must be > 0")
    row("float mask", lambda: f(mask=torch.ones(B, L)), ValueError, r"mask must be a bool tensor")
    row("mask of the wrong shape", lambda: f(mask=torch.ones(B, L + 1, dtype=torch.bool)), ValueError, r"mask must be")
    row("reduction='none'", lambda: f(reduction="none"), ValueError, r"reduction='none' is not supported")
    # heads as modules (a bias, LoRA) and autocast
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad(): head.weight.copy_(w); head.bias.copy_(randn(V, seed=13))
    row("head given as a module (nn.Linear with a bias)", lambda: f(w_=head),
        expected=lambda: abkd.ab_divergence(head(h).detach(), t, 0.2, 0.7), tol=(1e-5, 1e-6),
        note="equal to the materialized head(hidden)")
    row("inside torch.autocast('cpu', bfloat16)", lambda: autocast_call(f), expected=lambda: materialized(),
        tol=(3e-2, 1e-3), note="within bf16 tolerance of the fp32 materialized loss")
    return cases


def autocast_call(f):
    with torch.autocast("cpu", dtype=torch.bfloat16): return f().float()


# ---------------------------------------------------------------- the trainers' configurations
def config_cases() -> list[Case]:
    cases = []
    def row(entry, case, call, error, match):
        cases.append(Case(entry, case, call, error, match))
    kd = dict(loss="abkd", teacher="resnet32x4")
    cifar = lambda **kw: TrainConfig("resnet8x4", **kw)
    for case, kw, err, pattern in (
            ("unknown loss", dict(loss="crd"), ValueError, r"loss must be 'ce' or one of"),
            ("distillation without a teacher", dict(loss="kd"), ValueError, r"set teacher="),
            ("loss_params: alpha NaN", dict(kd, loss_params=dict(alpha=math.nan, beta=0.3)), ValueError, r"alpha must be finite"),
            ("loss_params: unknown key", dict(kd, loss_params=dict(alpah=0.8, beta=0.3)), ValueError, r"unknown parameter.*'alpah'"),
            ("loss_params: missing alpha", dict(kd, loss_params=dict(beta=0.3)), ValueError, r"needs alpha"),
            ("loss_params not a dict", dict(kd, loss_params=[0.8, 0.3]), TypeError, r"loss_params must be a dict"),
            ("epochs=0", dict(epochs=0), ValueError, r"epochs must be an int >= 1"),
            ("epochs=True", dict(epochs=True), TypeError, r"epochs must be an int"),
            ("batch_size='64'", dict(batch_size="64"), TypeError, r"batch_size must be an int"),
            ("lr=NaN", dict(lr=math.nan), ValueError, r"lr must be finite"),
            ("lr=-0.1", dict(lr=-0.1), ValueError, r"lr must be > 0"),
            ("lr='0.05'", dict(lr="0.05"), TypeError, r"lr must be a real number"),
            ("momentum=1.5", dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\)"),
            ("weight_decay=-1", dict(weight_decay=-1.0), ValueError, r"weight_decay must be in \[0, inf\]"),
            ("lr_decay=0", dict(lr_decay=0.0), ValueError, r"lr_decay must be in \(0, 1\]"),
            ("milestones=('a',)", dict(milestones=("a",)), TypeError, r"milestones must be a sequence of epoch numbers"),
            ("val_fraction=1", dict(val_fraction=1.0), ValueError, r"val_fraction must be in \[0, 1\)"),
            ("val_fraction=NaN", dict(val_fraction=math.nan), ValueError, r"val_fraction must be finite"),
            ("num_classes=1", dict(num_classes=1), ValueError, r"num_classes must be an int >= 2"),
            ("seed=1.5", dict(seed=1.5), TypeError, r"seed must be an int"),
            ("amp='yes'", dict(amp="yes"), TypeError, r"amp must be True or False")):
        row("cifar TrainConfig", case, lambda kw=kw: cifar(**kw), err, pattern)
    row("cifar TrainConfig", "model=None", lambda: TrainConfig(None), TypeError, r"model must be a model name")
    for case, kw, err, pattern in (
            ("unknown dataset", dict(dataset="mnist"), KeyError, r"unknown dataset 'mnist'; known:"),
            ("unknown stage", dict(stage="sft"), ValueError, r"stage must be 'kd' or 'teacher'"),
            ("unknown method", dict(method="kl"), ValueError, r"method must be one of"),
            ("loss_params: temperature 0", dict(loss_params=dict(temperature=0.0)), ValueError, r"temperature must be > 0"),
            ("loss_params: unknown key", dict(loss_params=dict(temp=1.0)), ValueError, r"unknown parameter.*'temp'"),
            ("epochs=0", dict(epochs=0), ValueError, r"epochs must be an int >= 1"),
            ("batch_size=True", dict(batch_size=True), TypeError, r"batch_size must be an int"),
            ("warmup_epochs >= epochs", dict(epochs=2, warmup_epochs=2), ValueError, r"warmup_epochs must be in \[0, epochs\)"),
            ("lr=NaN", dict(lr=math.nan), ValueError, r"lr must be finite"),
            ("lr='0.005'", dict(lr="0.005"), TypeError, r"lr must be a real number"),
            ("warmup_lr=0", dict(warmup_lr=0.0), ValueError, r"warmup_lr must be > 0"),
            ("momentum=-0.1", dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\)"),
            ("weight_decay=NaN", dict(weight_decay=math.nan), ValueError, r"weight_decay must be finite"),
            ("kd_weight=-1", dict(kd_weight=-1.0), ValueError, r"kd_weight must be in \[0, inf\]"),
            ("num_workers=-1", dict(num_workers=-1), ValueError, r"num_workers must be an int >= 0"),
            ("amp=1", dict(amp=1), TypeError, r"amp must be True or False")):
        row("CLIPTrainConfig", case, lambda kw=kw: CLIPTrainConfig(**kw), err, pattern)
    for case, kw, err, pattern in (
            ("unknown mode", dict(mode="rl"), ValueError, r"mode must be 'sft' or 'kd'"),
            ("unknown loss", dict(loss="kl"), ValueError, r"loss must be one of"),
            ("loss_params: alpha NaN", dict(loss_params=dict(alpha=math.nan, beta=0.7)), ValueError, r"alpha must be finite"),
            ("loss_params: unknown key", dict(loss_params=dict(alpha=0.2, betta=0.7)), ValueError, r"unknown parameter.*'betta'"),
            ("epochs=True", dict(epochs=True), (TypeError, ValueError), r"epochs must be .*int"),
            ("grad_accum=0", dict(grad_accum=0), ValueError, r"grad_accum must be"),
            ("lr=NaN", dict(lr=math.nan), ValueError, r"lr must be .*finite"),
            ("lr=-1e-4", dict(lr=-1e-4), ValueError, r"lr must be .*> 0"),
            ("lm_weight=NaN", dict(lm_weight=math.nan), ValueError, r"lm_weight must be .*finite"),
            ("max_grad_norm=-1", dict(max_grad_norm=-1.0), ValueError, r"max_grad_norm must be"),
            ("warmup_steps=-1", dict(warmup_steps=-1), ValueError, r"warmup_steps must be an int >= 0"),
            ("student_gen='always'", dict(student_gen="always"), ValueError, r"student_gen must be None, 'adaptive' or 'mixed'"),
            ("student_gen_ratio=NaN", dict(student_gen_ratio=math.nan), ValueError, r"student_gen_ratio must be .*(finite|\[0, 1\])"),
            ("teacher_dtype='float8'", dict(teacher_dtype="float8"), ValueError, r"teacher_dtype must be one of"),
            ("monitor_every=-1", dict(monitor_every=-1), ValueError, r"monitor_every must be an int >= 0"),
            ("kd_ratio=1.5", dict(kd_ratio=1.5), ValueError, r"kd_ratio must be a number in \[0, 1\]"),
            ("max_steps=0", dict(max_steps=0), ValueError, r"max_steps must be None .* or a positive int"),
            ("mixed_precision='fp8'", dict(mixed_precision="fp8"), ValueError, r"mixed_precision must be one of"),
            ("eval_every=-1", dict(eval_every=-1), ValueError, r"eval_every must be an int >= 0"),
            ("gradient_checkpointing='yes'", dict(gradient_checkpointing="yes"), ValueError,
             r"gradient_checkpointing must be True or False")):
        row("LLMTrainConfig", case, lambda kw=kw: LLMTrainConfig(**kw), err, pattern)
    return cases


# ---------------------------------------------------------------- the command line
class CLIExit(Exception):
    "abkd.cli.main ended with a non-zero status; the message is what it wrote to stderr (argparse's usage lines aside)."
    def __init__(self, status: int, message: str):
        super().__init__(message); self.status = status


def cli(*argv: str, experiments: Optional[dict] = None) -> int:
    """Run `abkd.cli.main(argv)` capturing its output: 0, or `CLIExit(status, stderr)` when it fails cleanly. A traceback,
    an exception escaping main, or a message of more than one line (besides argparse's usage) is a failure of the row."""
    err, out = io.StringIO(), io.StringIO()
    patch = mock.patch.dict(abkd.cli.EXPERIMENTS, experiments) if experiments else contextlib.nullcontext()
    with patch, contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = abkd.cli.main(list(argv))
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except KeyboardInterrupt:
            raise RuntimeError("KeyboardInterrupt escaped abkd.cli.main (a traceback for the user)") from None
    if status == 0: return 0
    text = err.getvalue()
    if "Traceback" in text: raise RuntimeError(f"abkd printed a traceback: {one_line(text)}")
    lines = [ln for ln in text.splitlines()                 # argparse's usage block and the progress bar aside
             if ln.strip() and not ln.startswith(("usage:", " ")) and not re.search(r"\d+%\|", ln)]
    if len(lines) != 1: raise RuntimeError(f"expected a one-line message on stderr, got {len(lines)} lines: {one_line(text)}")
    raise CLIExit(status, lines[0])


def stub_experiment(name: str, action: Callable[[Path, str], list]) -> dict:
    "EXPERIMENTS with `name` replaced by a stub whose reproduce(out, scale) runs `action` (no real work)."
    module = types.SimpleNamespace(reproduce=action)
    return {name: abkd.cli.Experiment(name, lambda: module, "stub")}


def started(out: Path, scale: str) -> list:
    raise AssertionError(f"the experiment started (out={out}): the bad --out was not refused before any work")


def interrupted(out: Path, scale: str) -> list:
    raise KeyboardInterrupt


def in_tmp(fn: Callable[[Path], object]) -> Callable[[], object]:
    "A call of fn(folder) in a fresh temporary folder, removed afterwards."
    def call():
        with tempfile.TemporaryDirectory(prefix="abkd-bad-inputs-") as d: return fn(Path(d))
    return call


def a_file(folder: Path) -> Path:
    path = folder / "afile"; path.write_text("not a folder"); return path


def cli_cases() -> list[Case]:
    stub = stub_experiment("theory", started)
    cases = []
    def row(case, call, match):
        cases.append(Case("abkd.cli.main", case, call, CLIExit, match))
    row("unknown experiment", lambda: cli("reproduce", "--only", "cifar10"), r"unknown experiment.*choose from")
    row("bad --scale", lambda: cli("reproduce", "--scale", "huge"), r"--scale.*invalid choice.*smoke")
    row("unknown command", lambda: cli("train-all"), r"invalid choice.*reproduce")
    row("--out naming a file", in_tmp(lambda d: cli("reproduce", "--only", "theory", "--out", str(a_file(d)),
                                                    experiments=stub)),
        r"(?i)afile.*(not a directory|is a file|a file)")
    row("--out in a read-only place", lambda: cli("reproduce", "--only", "theory", "--out", "/sys/abkd-out", experiments=stub),
        r"(?i)/sys/abkd-out.*(writ|permi|read-only)")
    row("Ctrl-C during a run", in_tmp(lambda d: cli("reproduce", "--only", "theory", "--out", str(d / "run"),
                                                    experiments=stub_experiment("theory", interrupted))),
        r"(?i)interrupt")
    row("--scale paper without the data (clip)",
        in_tmp(lambda d: cli("reproduce", "--only", "clip", "--scale", "paper", "--out", str(d / "paper"))),
        r"(?i)clip.*(need|not found).*(data|dataset)")
    row("distill images: missing --data folder", in_tmp(lambda d: cli("distill", "images", "--data", str(d / "none"),
        "--teacher", "resnet8", "--student", "resnet8", "--out", str(d / "o"))), r"data folder .* not found")
    row("distill images: unknown method", lambda: cli("distill", "images", "--data", "x", "--teacher", "resnet8",
        "--student", "resnet8", "--methods", "kd,abkdd"), r"unknown method\(s\) \['abkdd'\]; known: ce, kd, abkd")
    row("distill images: malformed --seeds", lambda: cli("distill", "images", "--data", "x", "--teacher", "resnet8",
        "--student", "resnet8", "--seeds", "0,x"), r"--seeds takes distinct non-negative integers")
    row("distill text: missing --data file", in_tmp(lambda d: cli("distill", "text", "--teacher", str(d), "--student",
        str(d), "--data", str(d / "none.jsonl"), "--out", str(d / "o"))), r"(?i)distill text: .*none\.jsonl")
    return cases


# ---------------------------------------------------------------- presets and the paper's tables
def preset_cases() -> list[Case]:
    "Presets asked for a setting the paper does not have, and the paper's tables asked for a cell they do not print."
    from abkd import results as R
    from abkd.cifar import recipes as cifar
    from abkd.clip import experiment as clip
    from abkd.llm import recipes as llm
    cases = []
    def row(entry, case, call, err, match):
        cases.append(Case(entry, case, call, err, match))
    row("abkd.llm.recipes.recipe", "unknown student", lambda: llm.recipe("gpt3", "abkd"), ValueError,
        r"unknown student 'gpt3'; known students: gpt2, gpt2-medium, gpt2-large")
    row("abkd.llm.recipes.recipe", "unknown method", lambda: llm.recipe("gpt2", "kl"), ValueError,
        r"unknown method 'kl'; known methods: sft, kd, rkl")
    row("abkd.llm.recipes.recipe", "MiniLLM (not a loss switch)", lambda: llm.recipe("gpt2", "minillm"), ValueError,
        r"'minillm' is not provided: MiniLLM optimises")
    row("abkd.cifar.recipes.recipe", "pair not in the paper", lambda: cifar.recipe("resnet56", "resnet21", "abkd"),
        ValueError, r"not a pair of the paper's CIFAR-100 tables; known pairs")
    row("abkd.cifar.recipes.recipe", "unknown method", lambda: cifar.recipe("resnet56", "resnet20", "abkdd"),
        ValueError, r"method must be one of the paper's .*got 'abkdd'")
    row("abkd.clip.experiment.method_recipe", "unknown dataset", lambda: clip.method_recipe("cifar10", "abkd"),
        KeyError, r"unknown dataset 'cifar10'; known: imagenet")
    row("abkd.clip.experiment.method_recipe", "unknown method", lambda: clip.method_recipe("dtd", "abkdd"),
        ValueError, r"unknown method 'abkdd'; choose from kd, abkd")
    row("abkd.results.paper_number", "row the paper does not report", lambda: R.paper_number(2, "GPT-5", "Dolly",
        "GPT-2 (0.1B)"), ValueError, r"Table 2 \(student GPT-2 \(0.1B\)\) has no row 'GPT-5'; its rows: Teacher")
    row("abkd.results.paper_number", "dataset the paper does not report", lambda: R.paper_number(16, "Ours", "HM",
        "CIFAR10"), ValueError, r"Table 16 has no dataset 'CIFAR10'; its datasets")
    row("abkd.results.paper_std", "std of a table without one", lambda: R.paper_std(14, "ResNet50 → vgg8", "KD"),
        ValueError, r"Table 14 prints no std.*the tables with a std: 2")
    row("abkd.results.paper_hyperparameters", "a results table", lambda: R.paper_hyperparameters(16), ValueError,
        r"no α, β table 16.*read it with paper_number")
    return cases


# ---------------------------------------------------------------- the table
def all_cases() -> list[Case]:
    cases = []
    for e in token_entries(): cases += token_cases(e)
    for name in VISION_LOSSES: cases += vision_cases(name)
    cases += hidden_cases() + config_cases() + preset_cases() + cli_cases()
    return cases


CASES = all_cases()
