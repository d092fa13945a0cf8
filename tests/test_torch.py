"""dmattn_cupy.torch on CPU tensors (the NumPy reference behind the custom ops).

Covers autograd (gradcheck in float64, bias gradients in the bias's own shape, partial
requires_grad), the flash-dmattn drop-in surface, views and expanded inputs, mask dtypes,
block maps, the custom ops (opcheck) and torch.compile(fullgraph=True), and error surfacing.
"""

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dmattn_cupy.torch as dmt  # noqa: E402
from dmattn_cupy.torch import flash_dmattn_func  # noqa: E402

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Plain torch math: the independent specification these tests compare against


def torch_attention(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0):
    """out (B, Sq, H, D) by plain torch ops (autograd gives the reference gradients)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    def per_query_head(t):
        return t.repeat_interleave(group, dim=1) if t.shape[1] == kv_heads != heads else t

    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    s = scale * qh @ kh.transpose(-1, -2)
    if bias is not None:
        s = s + per_query_head(bias)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = torch.ones(s.shape, dtype=torch.bool)
    if mask is not None:
        visible = visible & (per_query_head(mask) != 0)
    if causal:
        i = torch.arange(seqlen_q)[:, None]
        j = torch.arange(seqlen_k)[None, :]
        visible = visible & (j <= i + seqlen_k - seqlen_q)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key: P = 0
    return (p @ vh).transpose(1, 2)


def make_inputs(batch=1, seqlen_q=3, seqlen_k=4, heads=2, kv_heads=2, head_dim=4,
                dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def rand(shape, dtype=F64, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand_mask(shape, keep=0.7, seed=2):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep
    mask[..., 0] = True  # no empty rows unless a test asks for one
    return mask


def grads(fn, *tensors):
    """Gradients of (fn(...) * w).sum() for a fixed random w, for every tensor given."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    weight = rand(out.shape, seed=99).to(out.dtype)
    (out * weight).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Autograd


GRADCHECK_CASES = {
    "bias": dict(bias_shape=(1, 2, 3, 4)),
    "broadcast_bias": dict(bias_shape=(1, 1, 1, 4)),
    "gqa_kv_head_bias": dict(heads=4, kv_heads=2, bias_shape=(2, 2, 3, 4), batch=2),
    "mqa_causal_mask": dict(heads=3, kv_heads=1, seqlen_q=4, seqlen_k=6, causal=True,
                            bias_shape=(1, 3, 1, 6), mask_shape=(1, 1, 4, 6)),
    "causal_sq_gt_sk_softcap": dict(seqlen_q=5, seqlen_k=3, causal=True, softcap=1.5,
                                    bias_shape=(1, 2, 5, 3)),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES), ids=list(GRADCHECK_CASES))
def test_gradcheck_float64(case):
    opts = dict(GRADCHECK_CASES[case])
    bias_shape, mask_shape = opts.pop("bias_shape"), opts.pop("mask_shape", None)
    causal, softcap = opts.pop("causal", False), opts.pop("softcap", None)
    q, k, v = make_inputs(**opts)
    bias = rand(bias_shape)
    mask = None if mask_shape is None else rand_mask(mask_shape)
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]

    def fn(q, k, v, bias):
        return flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal,
                                 softcap=softcap)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_grads_match_torch_math(causal):
    q, k, v = make_inputs(batch=2, seqlen_q=5, seqlen_k=7, heads=4, kv_heads=2, head_dim=8)
    bias, mask = rand((2, 2, 5, 7)), rand_mask((2, 1, 5, 7))
    ours, our_grads = grads(
        lambda q, k, v, b: flash_dmattn_func(q, k, v, mask, b, 0.3, causal, 2.0), q, k, v, bias)
    ref, ref_grads = grads(
        lambda q, k, v, b: torch_attention(q, k, v, mask, b, 0.3, causal, 2.0), q, k, v, bias)
    assert_close(ours, ref)
    for got, want in zip(our_grads, ref_grads):
        assert_close(got, want)


@pytest.mark.parametrize("bias_shape", [(1, 1, 1, 6), (2, 1, 4, 6), (1, 4, 4, 6),
                                        (2, 2, 1, 6), (2, 4, 4, 6)])
def test_bias_grad_has_the_bias_shape(bias_shape):
    q, k, v = make_inputs(batch=2, seqlen_q=4, seqlen_k=6, heads=4, kv_heads=2)
    bias = rand(bias_shape)
    _, (dbias_ours,) = grads(lambda b: flash_dmattn_func(q, k, v, attn_bias=b), bias)
    _, (dbias_ref,) = grads(lambda b: torch_attention(q, k, v, bias=b), bias)
    assert dbias_ours.shape == bias_shape
    assert_close(dbias_ours, dbias_ref)


@pytest.mark.parametrize("needs", [("q",), ("k", "v"), ("bias",), ("v", "bias")])
def test_only_some_inputs_require_grad(needs):
    q, k, v = make_inputs()
    named = dict(q=q, k=k, v=v, bias=rand((1, 2, 3, 4)))
    for name in needs:
        named[name] = named[name].clone().requires_grad_(True)
    out = flash_dmattn_func(named["q"], named["k"], named["v"], attn_bias=named["bias"])
    out.square().sum().backward()
    for name, tensor in named.items():
        assert (tensor.grad is not None) == (name in needs), name

    ref_leaves = {n: t.detach().clone().requires_grad_(True) for n, t in named.items()}
    torch_attention(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"],
                    bias=ref_leaves["bias"]).square().sum().backward()
    for name in needs:
        assert_close(named[name].grad, ref_leaves[name].grad)


def test_no_grad_inputs_give_a_plain_tensor():
    q, k, v = make_inputs()
    out = flash_dmattn_func(q, k, v)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        out = flash_dmattn_func(q.requires_grad_(True), k, v)
    assert out.grad_fn is None


def test_mask_gets_no_gradient():
    q, k, v = make_inputs()
    mask = rand_mask((1, 2, 3, 4)).to(F64).requires_grad_(True)
    q.requires_grad_(True)
    flash_dmattn_func(q, k, v, attn_mask=mask).sum().backward()
    assert q.grad is not None and mask.grad is None


def test_fully_masked_row_gives_zero_output_and_finite_grads():
    q, k, v = make_inputs()
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False
    out, (dq, dk, dv) = grads(lambda q, k, v: flash_dmattn_func(q, k, v, mask), q, k, v)
    assert torch.all(out[0, 1] == 0)
    assert torch.all(dq[0, 1] == 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


# ---------------------------------------------------------------------------------------------
# Drop-in surface of flash-dmattn


def test_signature_matches_flash_dmattn():
    params = inspect.signature(flash_dmattn_func).parameters
    # flash-dmattn's arguments in its order, then dmattn_cupy's keyword addition
    assert list(params) == ["query", "key", "value", "attn_mask", "attn_bias", "softmax_scale",
                            "is_causal", "softcap", "deterministic", "return_attn_probs",
                            "block_map"]
    assert all(p.default is None for name, p in params.items()
               if name not in ("query", "key", "value"))


def test_positional_call_equals_keyword_call():
    q, k, v = make_inputs()
    bias, mask = rand((1, 2, 3, 4)), rand_mask((1, 2, 3, 4))
    positional = flash_dmattn_func(q, k, v, mask, bias, 0.5, True, 3.0, True, False)
    keyword = flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, softmax_scale=0.5,
                                is_causal=True, softcap=3.0)
    assert_close(positional, keyword, rtol=0, atol=0)
    assert_close(positional, torch_attention(q, k, v, mask, bias, 0.5, True, 3.0))


def test_backend_selection_without_cuda():
    if dmt.get_available_backends() != ["cpu"]:
        pytest.skip("a CUDA device is present")
    assert dmt.CUDA_AVAILABLE is False and dmt.TRITON_AVAILABLE is False
    assert dmt.flash_dmattn_func_auto() is flash_dmattn_func
    assert dmt.flash_dmattn_func_auto(backend="cpu") is flash_dmattn_func
    with pytest.raises(RuntimeError, match="CUDA"):
        dmt.flash_dmattn_func_auto(backend="cuda")
    with pytest.raises(RuntimeError, match="flash-dmattn"):
        dmt.flash_dmattn_func_auto(backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        dmt.flash_dmattn_func_auto(backend="tpu")


def test_return_attn_probs_gives_out_lse_and_probabilities():
    q, k, v = make_inputs(heads=4, kv_heads=2, seqlen_q=4, seqlen_k=6)
    bias, mask = rand((1, 2, 4, 6)), rand_mask((1, 1, 4, 6))
    mask[0, 0, 0] = False  # one empty row
    out, lse, probs = flash_dmattn_func(q, k, v, mask, bias, None, True, None, None, True)
    assert_close(out, flash_dmattn_func(q, k, v, mask, bias, is_causal=True), rtol=0, atol=0)
    assert probs.shape == (1, 4, 4, 6) and lse.shape == (1, 4, 4)
    assert_close(probs.sum(-1)[:, :, 1:], torch.ones(1, 4, 3, dtype=F64))
    assert torch.all(probs[:, :, 0] == 0) and torch.all(lse[:, :, 0] == float("-inf"))
    # O = P V, and lse = log sum exp of the visible scores
    assert_close(out, (probs @ v.transpose(1, 2).repeat_interleave(2, 1)).transpose(1, 2))
    scores = q.transpose(1, 2) @ k.transpose(1, 2).repeat_interleave(2, 1).transpose(-1, -2)
    scores = scores / 2 + bias.repeat_interleave(2, 1)
    causal = torch.arange(6)[None, :] <= torch.arange(4)[:, None] + 2
    visible = (mask != 0) & causal
    expected_lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)
    assert_close(lse[:, :, 1:], expected_lse[:, :, 1:])


def test_lse_is_not_differentiable():
    q, k, v = make_inputs()
    q.requires_grad_(True)
    out, lse, _ = flash_dmattn_func(q, k, v, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad


# ---------------------------------------------------------------------------------------------
# What torch users pass


def test_transposed_views_and_expanded_mask_and_bias():
    batch, heads, kv_heads, seqlen, head_dim = 2, 4, 2, 5, 8
    gen = torch.Generator().manual_seed(3)
    q_bhsd = torch.randn(batch, heads, seqlen, head_dim, generator=gen, dtype=F64)
    k_bhsd = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen, dtype=F64)
    v_bhsd = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen, dtype=F64)
    bias_row = rand((1, 1, 1, seqlen))
    mask_row = rand_mask((1, 1, 1, seqlen))

    def ours(q, k, v, bias):
        views = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        assert not views[0].is_contiguous()
        mask = mask_row.expand(batch, heads, seqlen, seqlen)
        big_bias = bias.expand(batch, heads, seqlen, seqlen)
        assert big_bias.stride() == (0, 0, 0, 1)
        return flash_dmattn_func(*views, attn_mask=mask, attn_bias=big_bias)

    def ref(q, k, v, bias):
        return torch_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                               v.transpose(1, 2).contiguous(), mask_row, bias)

    out, our_grads = grads(ours, q_bhsd, k_bhsd, v_bhsd, bias_row)
    expected, ref_grads = grads(ref, q_bhsd, k_bhsd, v_bhsd, bias_row)
    assert_close(out, expected)
    assert our_grads[3].shape == bias_row.shape  # expand's backward summed the dbias
    for got, want in zip(our_grads, ref_grads):
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, F64])
def test_mask_dtypes_give_the_same_result(dtype):
    q, k, v = make_inputs()
    mask = rand_mask((1, 2, 3, 4))
    expected = torch_attention(q, k, v, mask)
    assert_close(flash_dmattn_func(q, k, v, attn_mask=mask.to(dtype)), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_cpu_tensors_with_float32_bias(dtype):
    q, k, v = make_inputs(heads=4, kv_heads=2, head_dim=8, seqlen_q=6, seqlen_k=6)
    bias = rand((1, 4, 6, 6)).float()
    half = [t.to(dtype) for t in (q, k, v)]
    out, (dq, dk, dv, dbias) = grads(
        lambda q, k, v, b: flash_dmattn_func(q, k, v, attn_bias=b, is_causal=True),
        *half, bias)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    assert dbias.dtype == torch.float32
    ref, ref_grads = grads(lambda q, k, v, b: torch_attention(q, k, v, bias=b, causal=True),
                           *(t.to(F64) for t in half), bias.to(F64))
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    for got, want in zip((out, dq, dk, dv, dbias), (ref, *ref_grads)):
        assert (got.to(F64) - want).norm() <= tol * want.norm()


def test_float32_path_and_outputs_are_fresh():
    q, k, v = make_inputs(dtype=torch.float32)
    out, lse, _ = flash_dmattn_func(q, k, v, return_attn_probs=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.is_contiguous() and out.untyped_storage().data_ptr() not in {
        t.untyped_storage().data_ptr() for t in (q, k, v)}


# ---------------------------------------------------------------------------------------------
# Block maps


def test_block_map_is_the_masks_map_as_int32_words():
    import dmattn_cupy
    mask = rand_mask((2, 1, 5, 300), keep=0.01)
    mask[0, 0, 1, 128:256] = True  # a row keeping a whole tile: its `full` bit
    bits = dmt.block_map(mask)
    want = dmattn_cupy.block_map(mask.numpy()).bits
    assert bits.dtype == torch.int32 and tuple(bits.shape) == want.shape == (2, 1, 5, 2, 1)
    assert (bits.numpy().view(np.uint32) == want).all()
    assert bits[0, 0, 1, 1, 0] & 2  # tile 1 of row 1 kept whole


@pytest.mark.parametrize("mask_shape", [(2, 4, 6, 9), (1, 2, 6, 9), (2, 1, 1, 9)])
def test_forward_with_block_map_equals_forward_without(mask_shape):
    q, k, v = make_inputs(batch=2, seqlen_q=6, seqlen_k=9, heads=4, kv_heads=2)
    bias, mask = rand((2, 2, 6, 9)), rand_mask(mask_shape, keep=0.4)
    bm = dmt.block_map(mask)
    def attend(block_map):
        return lambda q, k, v, b: flash_dmattn_func(q, k, v, mask, b, is_causal=True, block_map=block_map)

    with_map, g_map = grads(attend(bm), q, k, v, bias)
    without, g = grads(attend(None), q, k, v, bias)
    assert_close(with_map, without, rtol=0, atol=0)
    for a, b in zip(g_map, g):
        assert_close(a, b, rtol=0, atol=0)
    assert_close(with_map, torch_attention(q, k, v, mask, bias, causal=True))


# ---------------------------------------------------------------------------------------------
# Custom ops and torch.compile


def test_opcheck_forward_op():
    q, k, v = (t.requires_grad_(True) for t in make_inputs(batch=2, heads=4, kv_heads=2))
    bias = rand((2, 2, 1, 4)).requires_grad_(True)
    mask = rand_mask((1, 1, 3, 4))
    torch.library.opcheck(torch.ops.dmattn_cupy.fwd.default,
                          (q, k, v, mask, bias, 0.4, True, 0.0, False))
    torch.library.opcheck(torch.ops.dmattn_cupy.fwd.default,
                          (q, k, v, None, None, 0.4, False, 1.0, False))
    torch.library.opcheck(torch.ops.dmattn_cupy.fwd.default,
                          (q, k, v, mask, bias, 0.4, True, 0.0, False, dmt.block_map(mask)))


def test_opcheck_backward_op_with_block_map():
    q, k, v = make_inputs(batch=2, heads=4, kv_heads=2)
    bias, mask = rand((2, 2, 1, 4)), rand_mask((1, 1, 3, 4))
    out, lse = torch.ops.dmattn_cupy.fwd(q, k, v, mask, bias, 0.4, True, 0.0, False)
    torch.library.opcheck(torch.ops.dmattn_cupy.bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, mask, bias, 0.4, True, 0.0, False,
                           dmt.block_map(mask)))


class TinyAttention(torch.nn.Module):
    """Projections, a learnable (1, H, S, S) bias and GQA heads: what a model layer does."""

    def __init__(self, dim=16, heads=4, kv_heads=2, head_dim=8, seqlen=6):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * head_dim)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(1, heads, seqlen, seqlen))
        self.out = torch.nn.Linear(heads * head_dim, dim)

    def forward(self, x, mask):
        batch, seqlen, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim,
             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, seqlen, self.heads, self.head_dim)
        k = k.view(batch, seqlen, self.kv_heads, self.head_dim)
        v = v.view(batch, seqlen, self.kv_heads, self.head_dim)
        bias = self.bias.expand(batch, -1, -1, -1)
        o = flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
        return self.out(o.reshape(batch, seqlen, -1))


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    model = TinyAttention()
    x = torch.randn(2, 6, 16)
    mask = rand_mask((2, 1, 6, 6))

    def step(fn):
        model.zero_grad()
        y = fn(x, mask)
        y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()]

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y_compiled, g_compiled = step(compiled)
    y_eager, g_eager = step(model)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(g_compiled, g_eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert model.bias.grad.shape == model.bias.shape


def test_compile_dynamic_shapes_trace_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    def attend(q, k, v, bias):
        return flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True)

    compiled = torch.compile(attend, fullgraph=True, dynamic=True, backend=counter)
    for seqlen in (5, 7, 9):
        q, k, v = make_inputs(batch=2, seqlen_q=seqlen, seqlen_k=seqlen, heads=4, kv_heads=2)
        bias = rand((1, 4, seqlen, seqlen)).requires_grad_(True)
        out = compiled(q, k, v, bias)
        out.sum().backward()
        assert_close(out, torch_attention(q, k, v, bias=bias.detach(), causal=True))
        assert bias.grad.shape == bias.shape
    assert counter.frame_count == 1  # the fake op did not specialize the sizes


# ---------------------------------------------------------------------------------------------
# Errors come from dmattn_cupy's validation


def _bad_calls():
    q, k, v = make_inputs()
    return {
        "k_head_dim": (ValueError, lambda: flash_dmattn_func(q, k[..., :2], v)),
        "heads_not_multiple": (ValueError, lambda: flash_dmattn_func(
            torch.cat([q, q[:, :, :1]], 2), k, v)),
        "bias_bad_seqlen": (ValueError, lambda: flash_dmattn_func(
            q, k, v, attn_bias=rand((1, 2, 3, 5)))),
        "mask_bad_heads": (ValueError, lambda: flash_dmattn_func(
            q, k, v, attn_mask=rand_mask((1, 3, 3, 4)))),
        "q_rank": (ValueError, lambda: flash_dmattn_func(q[0], k, v)),
        "mixed_dtypes": (TypeError, lambda: flash_dmattn_func(q.float(), k, v)),
        "int_qkv": (TypeError, lambda: flash_dmattn_func(*(t.long() for t in (q, k, v)))),
        "numpy_query": (TypeError, lambda: flash_dmattn_func(q.numpy(), k, v)),
        "negative_softcap": (ValueError, lambda: flash_dmattn_func(q, k, v, softcap=-1.0)),
        "causal_not_bool": (TypeError, lambda: flash_dmattn_func(q, k, v, is_causal="yes")),
        "two_devices": (ValueError, lambda: flash_dmattn_func(q.to("meta"), k, v)),
        "block_map_without_mask": (ValueError, lambda: flash_dmattn_func(
            q, k, v, block_map=dmt.block_map(rand_mask((1, 2, 3, 4))))),
        "block_map_of_another_shape": (ValueError, lambda: flash_dmattn_func(
            q, k, v, attn_mask=rand_mask((1, 2, 3, 4)), block_map=dmt.block_map(rand_mask((1, 1, 3, 4))))),
        "block_map_int64": (ValueError, lambda: flash_dmattn_func(
            q, k, v, attn_mask=rand_mask((1, 2, 3, 4)), block_map=dmt.block_map(rand_mask((1, 2, 3, 4))).long())),
        "block_map_numpy": (TypeError, lambda: flash_dmattn_func(
            q, k, v, attn_mask=rand_mask((1, 2, 3, 4)), block_map=dmt.block_map(rand_mask((1, 2, 3, 4))).numpy())),
        "block_map_of_numpy_mask": (TypeError, lambda: dmt.block_map(rand_mask((1, 2, 3, 4)).numpy())),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_raises(case):
    error, call = _bad_calls()[case]
    with pytest.raises(error):
        call()
