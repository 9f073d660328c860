"""The fused-linear loss (`abkd.kernels.fused_linear`, through the front `abkd.core.ab_divergence_from_hidden`) against
materialized logits: weight, module and callable heads (a PEFT LoRA, a bias, a scale, softcapping), autocast regions
(CPU; CUDA where present), and its input checks."""
import math
import warnings

import pytest
import torch

from abkd.core import ab_divergence, ab_divergence_from_hidden


@pytest.mark.parametrize("impl", ["chunked", "triton", "reference"])
def test_fused_linear_matches_materialized(impl):
    torch.manual_seed(0)
    hs = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    ws = (torch.randn(120, 8, dtype=torch.float64) / 3).requires_grad_()
    ht, wt = torch.randn(2, 11, 6, dtype=torch.float64), torch.randn(120, 6, dtype=torch.float64) / 3
    mask = torch.rand(2, 11) > 0.3
    out = ab_divergence_from_hidden(hs, ws, (ht, wt), 0.2, 0.7, temperature=2.0, mask=mask, chunk_tokens=4, impl=impl)
    gh, gw = torch.autograd.grad(out, (hs, ws))
    ref = ab_divergence(hs @ ws.T, ht @ wt.T, 0.2, 0.7, temperature=2.0, mask=mask, impl="reference")
    rh, rw = torch.autograd.grad(ref, (hs, ws))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh, rh, rtol=0, atol=1e-12 * rh.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-12 * rw.abs().max().item())


def test_fused_linear_all_masked_and_no_grad():
    h, w, t = torch.randn(3, 4), torch.randn(20, 4, requires_grad=True), torch.randn(3, 20)
    out = ab_divergence_from_hidden(h, w, t, 1, 0, mask=torch.zeros(3, dtype=torch.bool), reduction="sum")
    out.backward()
    assert out.item() == 0 and w.grad.abs().sum() == 0
    with torch.no_grad():
        v = ab_divergence_from_hidden(h, w, t, 1, 0)
    torch.testing.assert_close(v, ab_divergence(h @ w.detach().T, t, 1, 0), rtol=1e-5, atol=0)


def test_fused_linear_bad_inputs():
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match=r"\[V, 8\]"):
        ab_divergence_from_hidden(h, torch.randn(50, 7), torch.randn(4, 50), 1, 0)
    with pytest.raises(ValueError, match="V=60"):
        ab_divergence_from_hidden(h, w, (torch.randn(4, 6), torch.randn(60, 6)), 1, 0)
    with pytest.raises(ValueError, match="positions"):
        ab_divergence_from_hidden(h, w, (torch.randn(5, 6), torch.randn(50, 6)), 1, 0)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ab_divergence_from_hidden(h, w, torch.randn(4, 50), 1, 0, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="teacher must be"):
        ab_divergence_from_hidden(h, w, [torch.randn(4, 6)], 1, 0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        ab_divergence_from_hidden(h, w, torch.randn(4, 50), float("nan"), 0)
    t = torch.randn(4, 50); t[0] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        ab_divergence_from_hidden(h, w, t, 1, 0)


# ---- autocast: the head's matmuls in the region, the divergence in float32 ------------------------------------------

def _rel(a, b):
    "max |a − b| / max |b| (in float64)."
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# relative tolerances (value, gradients) against the float32 materialized loss: a few bf16/fp16 steps of the logits
AUTOCAST_TOL = {torch.bfloat16: (2e-3, 4e-2), torch.float16: (3e-4, 6e-3)}


def _autocast_case(device, dtype, teacher_kind, chunk_tokens=8, impl="auto"):
    "Fused loss in an autocast region vs the float32 materialized loss (no autocast); errors and output dtypes."
    g = torch.Generator().manual_seed(1)
    n, h, h_t, v = 37, 16, 24, 300
    hs = torch.randn(n, h, generator=g).to(device).requires_grad_()
    ws = (torch.randn(v, h, generator=g) / 4).to(device).requires_grad_()
    ht, wt = torch.randn(n, h_t, generator=g).to(device), (torch.randn(v, h_t, generator=g) / 4).to(device)
    mask = (torch.rand(n, generator=g) > 0.2).to(device)
    teacher = {"hidden": (ht, wt), "logits": ht @ wt.T}[teacher_kind]
    with torch.autocast(device, dtype=dtype):
        out = ab_divergence_from_hidden(hs, ws, teacher, 0.2, 0.7, mask=mask, chunk_tokens=chunk_tokens, impl=impl)
    gh, gw = torch.autograd.grad(out, (hs, ws))
    ref = ab_divergence(hs @ ws.T, ht @ wt.T, 0.2, 0.7, mask=mask, impl="reference")
    rh, rw = torch.autograd.grad(ref, (hs, ws))
    return (_rel(out, ref), _rel(gh, rh), _rel(gw, rw)), (out.dtype, gh.dtype, gw.dtype)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_kind", ["hidden", "logits"])
def test_fused_linear_cpu_autocast(dtype, teacher_kind, impl):
    errors, dtypes = _autocast_case("cpu", dtype, teacher_kind, impl=impl)
    tol_v, tol_g = AUTOCAST_TOL[dtype]
    assert errors[0] < tol_v and max(errors[1:]) < tol_g, errors
    assert errors[0] > 0                          # the matmuls did run in the 16-bit dtype
    assert dtypes == (torch.float32,) * 3         # value in float32, gradients in the parameters' dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_kind", ["hidden", "logits"])
def test_fused_linear_cuda_autocast(dtype, teacher_kind):
    errors, dtypes = _autocast_case("cuda", dtype, teacher_kind)
    tol_v, tol_g = AUTOCAST_TOL[dtype]
    assert errors[0] < tol_v and max(errors[1:]) < tol_g, errors
    assert dtypes == (torch.float32,) * 3


def test_fused_linear_autocast_matches_materialized_in_the_region():
    "Same 16-bit logits on both sides: the fused loss equals the materialized one computed in the same region."
    torch.manual_seed(2)
    hs, ws = torch.randn(3, 7, 16, requires_grad=True), (torch.randn(200, 16) / 4).requires_grad_()
    t = torch.randn(3, 7, 200)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = ab_divergence_from_hidden(hs, ws, t, 0.5, 0.5, chunk_tokens=5, reduction="sum")
            mat = ab_divergence(hs @ ws.T, t, 0.5, 0.5, reduction="sum", impl="reference")
        torch.testing.assert_close(out, mat, rtol=1e-6, atol=0)


@pytest.fixture
def bf16_accelerator():
    "An Accelerator with bf16 autocast; accelerate keeps its state process-wide, so it is reset afterwards."
    import accelerate
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)     # whatever an earlier test left
    yield accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fused_linear_accelerate_autocast(bf16_accelerator):
    accelerator = bf16_accelerator
    torch.manual_seed(3)
    hs, ws = torch.randn(2, 9, 16, requires_grad=True), (torch.randn(150, 16) / 4).requires_grad_()
    ht, wt = torch.randn(2, 9, 12), torch.randn(150, 12) / 4
    with accelerator.autocast():
        assert torch.is_autocast_enabled("cpu")
        out = ab_divergence_from_hidden(hs, ws, (ht, wt), 0.2, 0.7, chunk_tokens=4)
    accelerator.backward(out)
    ref = ab_divergence(hs @ ws.T, ht @ wt.T, 0.2, 0.7, impl="reference")
    rh, rw = torch.autograd.grad(ref, (hs, ws))
    tol_v, tol_g = AUTOCAST_TOL[torch.bfloat16]
    assert 0 < _rel(out, ref) < tol_v
    assert _rel(hs.grad, rh) < tol_g and _rel(ws.grad, rw) < tol_g


def test_fused_linear_autocast_16bit_hidden_keeps_its_dtype():
    "Hidden states out of an autocast layer are bf16: their gradient comes back in bf16, the weight's in float32."
    torch.manual_seed(4)
    hs = torch.randn(20, 16).bfloat16().requires_grad_()
    ws = (torch.randn(120, 16) / 4).requires_grad_()
    t = torch.randn(20, 120)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ab_divergence_from_hidden(hs, ws, t, 1.0, 0.5, chunk_tokens=6)
    out.backward()
    h32 = hs.detach().float().requires_grad_()
    ref = ab_divergence(h32 @ ws.T, t, 1.0, 0.5, impl="reference")
    rh, rw = torch.autograd.grad(ref, (h32, ws))
    assert hs.grad.dtype == torch.bfloat16 and ws.grad.dtype == torch.float32
    assert _rel(hs.grad, rh) < 4e-2 and _rel(ws.grad, rw) < 4e-2


def test_fused_linear_fp16_small_gradients_do_not_underflow():
    """At T = 100 the logit gradients are ~1e-8, below float16's smallest normal (6e-5) and near its smallest
    subnormal (6e-8): the materialized loss in the same fp16 region loses them (its logit gradient is cast to fp16);
    the fused loss scales each chunk's by a power of two before the fp16 products and keeps them."""
    torch.manual_seed(5)
    n, h, v, temperature = 256, 16, 512, 100.0
    hs, ws = torch.randn(n, h, requires_grad=True), (torch.randn(v, h) / 4).requires_grad_()
    t = torch.randn(n, v)
    with torch.autocast("cpu", dtype=torch.float16):
        out = ab_divergence_from_hidden(hs, ws, t, 0.2, 0.7, temperature=temperature, chunk_tokens=128)
        mat = ab_divergence(hs @ ws.T, t, 0.2, 0.7, temperature=temperature, impl="reference")
    gh, gw = torch.autograd.grad(out, (hs, ws))
    mh, mw = torch.autograd.grad(mat, (hs, ws))
    ref = ab_divergence(hs @ ws.T, t, 0.2, 0.7, temperature=temperature, impl="reference")
    rh, rw = torch.autograd.grad(ref, (hs, ws))
    assert _rel(mh, rh) > 0.5 and _rel(mw, rw) > 0.5                          # the case does underflow in fp16
    assert _rel(out, ref) < 1e-4 and _rel(gh, rh) < 3e-3 and _rel(gw, rw) < 3e-3


# ---- heads as modules and callables ---------------------------------------------------------------------------------

def _tiny_gpt2_lora(vocab=97, width=16):
    "A random 1-layer GPT-2 with a LoRA adapter on lm_head (B initialized non-zero, so the adapter changes the logits)."
    import peft
    import transformers
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=1, n_head=2,
                                  bos_token_id=None, eos_token_id=None)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                          # peft: lm_head is tied to the input embedding
        return peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), lora).double()


def _softcap(cap):
    return lambda logits: cap * torch.tanh(logits / cap)


def _head_case(kind):
    "(head to pass, the same head for the materialized reference, the tensors whose gradients must match), float64."
    torch.manual_seed(7)
    if kind == "peft_lora":
        head = _tiny_gpt2_lora().get_output_embeddings()
        return head, head, [p for p in head.parameters() if p.requires_grad], 16
    lin = torch.nn.Linear(16, 97, dtype=torch.float64)
    if kind == "linear_bias":
        return lin, lin, [lin.weight, lin.bias], 16
    if kind == "scale":                                          # a learned logit scale, captured by the lambda
        log_scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        head = lambda x: lin(x) * log_scale.exp()                # noqa: E731
        return head, head, [lin.weight, lin.bias, log_scale], 16
    if kind == "softcap":                                        # Gemma-style cap·tanh(logits/cap)
        head = lambda x: _softcap(2.0)(lin(x) * 4)               # noqa: E731
        return head, head, [lin.weight, lin.bias], 16
    if kind == "sliced_weight":                                  # a non-leaf closure: the unpadded rows of a weight
        padded = torch.randn(128, 16, dtype=torch.float64, requires_grad=True)
        rows = padded[:97]
        head = lambda x: x @ rows.T                              # noqa: E731
        return head, head, [padded], 16
    raise KeyError(kind)


HEAD_KINDS = ["peft_lora", "linear_bias", "scale", "softcap", "sliced_weight"]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_fused_linear_head_modules_and_callables(kind, reduction):
    head, ref_head, params, width = _head_case(kind)
    hs = torch.randn(2, 11, width, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 11, 97, dtype=torch.float64) * 2
    mask = torch.rand(2, 11) > 0.3
    out = ab_divergence_from_hidden(hs, head, teacher, 0.2, 0.7, temperature=1.5, mask=mask, reduction=reduction,
                                    chunk_tokens=4)
    got = torch.autograd.grad(out, [hs, *params])
    ref = ab_divergence(ref_head(hs), teacher, 0.2, 0.7, temperature=1.5, mask=mask, reduction=reduction,
                        impl="reference")
    want = torch.autograd.grad(ref, [hs, *params])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * w.abs().max().item())


@pytest.mark.parametrize("impl", ["chunked", "triton", "reference"])
def test_fused_linear_module_head_with_each_implementation(impl):
    head, _, params, width = _head_case("linear_bias")
    hs = torch.randn(13, width, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(13, 97, dtype=torch.float64)
    out = ab_divergence_from_hidden(hs, head, teacher, 0.8, 0.3, chunk_tokens=5, impl=impl)
    ref = ab_divergence(head(hs), teacher, 0.8, 0.3, impl="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    for g, w in zip(torch.autograd.grad(out, [hs, *params]), torch.autograd.grad(ref, [hs, *params])):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * w.abs().max().item())


def test_fused_linear_lora_adapter_is_not_ignored():
    "The bare weight of a LoRA head is the base matrix only; the module gives the materialized value (backward())."
    model = _tiny_gpt2_lora()
    head = model.get_output_embeddings()
    ids = torch.randint(0, 97, (2, 9))
    hs = model.base_model.model.transformer(ids).last_hidden_state            # through the model: grads reach it
    teacher = torch.randn(2, 9, 97, dtype=torch.float64) * 2
    out = ab_divergence_from_hidden(hs, head, teacher, 0.2, 0.7, chunk_tokens=4)
    bare = ab_divergence_from_hidden(hs.detach(), head.weight.detach(), teacher, 0.2, 0.7, chunk_tokens=4)
    ref = ab_divergence(head(hs), teacher, 0.2, 0.7, impl="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    assert abs(bare.item() - ref.item()) > 1e-2 * ref.item()                  # the adapter matters here
    trainable = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(ref, trainable, retain_graph=True)
    out.backward()
    for p, w in zip(trainable, want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-12 * w.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_lora_head_under_autocast(dtype):
    model = _tiny_gpt2_lora().float()
    head = model.get_output_embeddings()
    params = [p for p in head.parameters() if p.requires_grad]
    hs = torch.randn(3, 7, 16, requires_grad=True)
    teacher = torch.randn(3, 7, 97) * 2
    with torch.autocast("cpu", dtype=dtype):
        out = ab_divergence_from_hidden(hs, head, teacher, 0.2, 0.7, chunk_tokens=5)
    got = torch.autograd.grad(out, [hs, *params])
    ref = ab_divergence(head(hs), teacher, 0.2, 0.7, impl="reference")
    want = torch.autograd.grad(ref, [hs, *params])
    tol_v, tol_g = AUTOCAST_TOL[dtype]
    assert 0 < _rel(out, ref) < tol_v
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and _rel(g, w) < tol_g


def test_fused_linear_teacher_heads():
    "The teacher's head as a frozen module or a callable (softcapped), chunk by chunk."
    torch.manual_seed(8)
    hs, ws = torch.randn(13, 8, dtype=torch.float64, requires_grad=True), torch.randn(60, 8, dtype=torch.float64)
    ht = torch.randn(13, 12, dtype=torch.float64)
    t_lin = torch.nn.Linear(12, 60, dtype=torch.float64).requires_grad_(False)
    for t_head in (t_lin, lambda x: _softcap(3.0)(t_lin(x) * 5)):
        out = ab_divergence_from_hidden(hs, ws, (ht, t_head), 0.2, 0.7, chunk_tokens=4)
        ref = ab_divergence(hs @ ws.T, t_head(ht), 0.2, 0.7, impl="reference")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.autograd.grad(out, hs)[0], torch.autograd.grad(ref, hs)[0], rtol=1e-10,
                                   atol=1e-14)


def test_fused_linear_head_bad_inputs():
    h, t = torch.randn(4, 8), torch.randn(4, 50)
    lin = torch.nn.Linear(8, 50)
    with pytest.raises(ValueError, match="teacher logits have V=50 but student_head gives V=49"):
        ab_divergence_from_hidden(h, torch.nn.Linear(8, 49), t, 1, 0)
    with pytest.raises(ValueError, match="teacher_head gives V=51 logits but student_head gives V=50"):
        ab_divergence_from_hidden(h, lin, (torch.randn(4, 6), torch.nn.Linear(6, 51).requires_grad_(False)), 1, 0)
    with pytest.raises(TypeError, match="student_head must be a \\[V, H\\] weight tensor, an nn.Module or a callable"):
        ab_divergence_from_hidden(h, "lm_head", t, 1, 0)
    with pytest.raises(ValueError, match="student_head must map hidden \\[C, 8\\] to logits \\[C, V\\]"):
        ab_divergence_from_hidden(h, lambda x: lin(x).sum(-1), t, 1, 0)
    with pytest.raises(TypeError, match="student_head must return floating logits"):
        ab_divergence_from_hidden(h, lambda x: (lin(x),), t, 1, 0)
    with pytest.raises(ValueError, match="student_head failed on .* row of student_hidden on cpu.*same device"):
        ab_divergence_from_hidden(h, torch.nn.Linear(8, 50, device="meta"), t, 1, 0)
    with pytest.raises(ValueError, match="student_head failed on .* float32 row .*the same dtype or a torch.autocast"):
        ab_divergence_from_hidden(h, torch.nn.Linear(8, 50).bfloat16(), t, 1, 0)
    with pytest.raises(ValueError, match="student_head failed on .* float32 row of student_hidden.*same dtype"):
        ab_divergence_from_hidden(h, torch.randn(50, 8).bfloat16(), t, 1, 0)
    with pytest.raises(ValueError, match="student_head returned logits on meta"):
        ab_divergence_from_hidden(h, lambda x: torch.zeros(x.shape[0], 50, device="meta"), t, 1, 0)
    with pytest.raises(ValueError, match="teacher_head requires a gradient.*requires_grad_\\(False\\)"):
        ab_divergence_from_hidden(h, lin, (torch.randn(4, 6), torch.nn.Linear(6, 50)), 1, 0)
    with pytest.raises(ValueError, match="teacher_head requires a gradient"):
        ab_divergence_from_hidden(h, lin, (torch.randn(4, 6), torch.randn(50, 6, requires_grad=True)), 1, 0)


def test_fused_linear_backward_once_and_no_grad():
    lin = torch.nn.Linear(8, 30)
    h, t = torch.randn(5, 8, requires_grad=True), torch.randn(5, 30)
    out = ab_divergence_from_hidden(h, lin, t, 1, 0, chunk_tokens=2)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once per forward"):
        out.backward()
    with torch.no_grad():
        v = ab_divergence_from_hidden(h, lin, t, 1, 0, chunk_tokens=2)
    assert not v.requires_grad
    torch.testing.assert_close(v, out.detach(), rtol=1e-6, atol=0)
