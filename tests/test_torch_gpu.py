"""dmattn_cupy.torch on CUDA tensors: zero copies, torch's stream and allocator, accuracy of
float16/bfloat16 gradients against float64 math on the CPU, training, torch.compile.

Every test needs a CUDA build of torch, CuPy and a GPU; without them the `gpu` marker (see
conftest.py) or the skipif below skips the module.
"""

import copy
import math

import pytest

torch = pytest.importorskip("torch")

import dmattn_cupy.torch as dmt  # noqa: E402
from dmattn_cupy.torch import flash_dmattn_func  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA and a GPU"),
]

CUDA = "cuda"
F64 = torch.float64


def torch_attention(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0):
    """Plain torch math (any device/dtype): out (B, Sq, H, D); rows with no key give 0."""
    _, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    def per_query_head(t):
        return t.repeat_interleave(group, dim=1) if t.shape[1] == kv_heads != heads else t

    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    s = scale * q.transpose(1, 2) @ kh.transpose(-1, -2)
    if bias is not None:
        s = s + per_query_head(bias).to(s.dtype)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if mask is not None:
        visible = visible & (per_query_head(mask) != 0)
    if causal:
        i = torch.arange(seqlen_q, device=s.device)[:, None]
        j = torch.arange(seqlen_k, device=s.device)[None, :]
        visible = visible & (j <= i + seqlen_k - seqlen_q)
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1))
    return (p @ vh).transpose(1, 2)


def randn(*shape, dtype=torch.float16, seed=0, device=CUDA):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def rel_error(got, want):
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().norm()).item()


@pytest.fixture
def backend_spy(monkeypatch):
    """Records what dmattn_cupy's CUDA backend receives and returns (pointers, strides,
    stream), without changing what it computes."""
    cupy = pytest.importorskip("cupy")
    import dmattn_cupy._cuda as backend

    seen = {}
    forward, backward = backend.forward, backend.backward

    def describe(prefix, **arrays):
        for name, array in arrays.items():
            if array is not None:
                seen[f"{prefix}{name}"] = (array.data.ptr, tuple(array.strides))
        seen[f"{prefix}stream"] = cupy.cuda.get_current_stream().ptr

    def spy_forward(q, k, v, mask, bias, problem, return_lse, **kwargs):
        describe("fwd_", q=q, k=k, v=v, mask=mask, bias=bias)
        seen["fwd_block_map"] = kwargs.get("block_map")
        result = forward(q, k, v, mask, bias, problem, return_lse, **kwargs)
        seen["fwd_out"], seen["fwd_lse"] = result[0].data.ptr, result[1].data.ptr
        return result

    def spy_backward(dout, q, k, v, out, lse, mask, bias, problem, deterministic, **kwargs):
        describe("bwd_", dout=dout, q=q, k=k, v=v, out=out, lse=lse, mask=mask, bias=bias)
        seen["bwd_block_map"] = kwargs.get("block_map")
        return backward(dout, q, k, v, out, lse, mask, bias, problem, deterministic, **kwargs)

    monkeypatch.setattr(backend, "forward", spy_forward)
    monkeypatch.setattr(backend, "backward", spy_backward)
    return seen


# ---------------------------------------------------------------------------------------------
# Zero copies, torch's allocator, torch's stream


def _views(batch=2, heads=4, kv_heads=2, seqlen=64, head_dim=64, dtype=torch.float16):
    """Head-first tensors transposed to (B, S, H, D) views, an expanded bool mask and an
    expanded float32 bias: nothing contiguous, nothing materialized."""
    q = randn(batch, heads, seqlen, head_dim, dtype=dtype, seed=1).transpose(1, 2)
    k = randn(batch, kv_heads, seqlen, head_dim, dtype=dtype, seed=2).transpose(1, 2)
    v = randn(batch, kv_heads, seqlen, head_dim, dtype=dtype, seed=3).transpose(1, 2)
    mask = (randn(1, 1, seqlen, seqlen, seed=4) > -1.0).expand(batch, heads, -1, -1)
    bias = randn(1, heads, 1, seqlen, dtype=torch.float32, seed=5).expand(batch, -1, seqlen, -1)
    return q, k, v, mask, bias


def test_kernels_read_the_callers_memory_and_write_torch_tensors(backend_spy):
    q, k, v, mask, bias = _views()
    assert not q.is_contiguous() and mask.stride()[:2] == (0, 0) and bias.stride(2) == 0
    out, lse = torch.ops.dmattn_cupy.fwd(q, k, v, mask, bias, 0.125, True, 0.0, False)
    for name, tensor in dict(q=q, k=k, v=v, mask=mask, bias=bias).items():
        ptr, strides = backend_spy[f"fwd_{name}"]
        assert ptr == tensor.data_ptr(), name
        assert strides == tuple(s * tensor.element_size() for s in tensor.stride()), name
    assert backend_spy["fwd_out"] == out.data_ptr()  # the kernel wrote the returned tensor
    assert backend_spy["fwd_lse"] == lse.data_ptr()
    assert out.dtype == q.dtype and lse.dtype == torch.float32


def test_backward_reads_saved_tensors_in_place(backend_spy):
    q, k, v, mask, bias = _views(dtype=torch.bfloat16)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))  # still non-contiguous
    bias = bias.detach().requires_grad_(True)
    out = flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    out.backward(torch.ones_like(out))  # a contiguous dout
    for name in ("q", "k", "v", "mask", "bias"):
        assert backend_spy[f"bwd_{name}"] == backend_spy[f"fwd_{name}"], name
    assert backend_spy["bwd_out"][0] == out.data_ptr()
    assert bias.grad.shape == bias.shape and q.grad.shape == q.shape


def test_outputs_come_from_torchs_allocator_and_inputs_are_not_copied():
    cupy = pytest.importorskip("cupy")
    batch, heads, seqlen, head_dim = 2, 8, 1024, 64
    q, k, v, mask, bias = _views(batch, heads, heads, seqlen, head_dim)
    dense = [t.contiguous() for t in (q, k, v, mask, bias)]
    pool = cupy.get_default_memory_pool()

    def peak_extra(inputs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, pool_before = torch.cuda.memory_allocated(), pool.used_bytes()
        out = flash_dmattn_func(*inputs[:3], attn_mask=inputs[3], attn_bias=inputs[4])
        torch.cuda.synchronize()
        assert pool.used_bytes() == pool_before  # nothing went through CuPy's own pool
        assert torch.cuda.memory_allocated() - before >= out.numel() * out.element_size()
        return torch.cuda.max_memory_allocated() - before

    peak_extra(dense)  # warm-up: kernels compiled and loaded before measuring
    # Same shapes and dtypes, so the same kernels and scratch: reading views must not cost a
    # byte more than reading dense tensors (a copy of the expanded bias alone is 64 MiB).
    assert peak_extra([q, k, v, mask, bias]) <= peak_extra(dense)


def test_runs_on_torchs_current_stream(backend_spy):
    q, k, v, mask, bias = _views(dtype=torch.float16)
    q, k, v, mask, bias = (t.contiguous() for t in (q, k, v, mask, bias))
    expected = flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    flash_dmattn_func(*leaves[:3], attn_mask=mask, attn_bias=leaves[3],
                      deterministic=True).float().square().sum().backward()
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    inputs = [torch.empty_like(t) for t in (q, k, v, bias)]
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keep `side` busy: work queued after it must wait
        for dst, src in zip(inputs, (q, k, v, bias)):
            dst.copy_(src)
        side_leaves = [t.requires_grad_(True) for t in inputs]
        out = flash_dmattn_func(*side_leaves[:3], attn_mask=mask, attn_bias=side_leaves[3],
                                deterministic=True)
        out.float().square().sum().backward()
    assert backend_spy["fwd_stream"] == side.cuda_stream
    assert backend_spy["bwd_stream"] == side.cuda_stream
    side.synchronize()
    # Had the kernels run on another stream, they would have read `inputs` before the copies.
    torch.testing.assert_close(out, expected)
    for got, want in zip(side_leaves, leaves):
        torch.testing.assert_close(got.grad, want.grad)


def test_block_map_reaches_the_kernels_in_place_and_changes_nothing(backend_spy):
    """The map reaches forward and backward in place; outputs and (deterministic) gradients are
    bitwise those of the call without it."""
    cupy = pytest.importorskip("cupy")
    import dmattn_cupy
    batch, heads, kv_heads, seqlen, head_dim = 2, 8, 2, 1000, 128
    q = randn(batch, seqlen, heads, head_dim, dtype=torch.bfloat16, seed=1)
    k = randn(batch, seqlen, kv_heads, head_dim, dtype=torch.bfloat16, seed=2)
    v = randn(batch, seqlen, kv_heads, head_dim, dtype=torch.bfloat16, seed=3)
    bias = randn(batch, kv_heads, seqlen, seqlen, dtype=torch.bfloat16, seed=4)
    # whole 128-key blocks per 64-row block, and sprinkled holes: full, partial and empty tiles
    blocks = randn(batch, kv_heads, -(-seqlen // 64), -(-seqlen // 128), seed=5) > 0.3
    mask = blocks.repeat_interleave(64, 2).repeat_interleave(128, 3)[:, :, :seqlen, :seqlen].contiguous()
    mask &= randn(batch, kv_heads, seqlen, seqlen, seed=6) > -2.5
    bm = dmt.block_map(mask)
    want = dmattn_cupy.block_map(cupy.from_dlpack(mask)).bits
    assert bm.dtype == torch.int32 and bm.is_cuda
    assert (cupy.from_dlpack(bm).view(cupy.uint32) == want).all()

    def run(block_map):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = flash_dmattn_func(*leaves[:3], attn_mask=mask, attn_bias=leaves[3], is_causal=True,
                                deterministic=True, block_map=block_map)
        out.float().square().sum().backward()
        return out, [t.grad for t in leaves]

    out, grads = run(bm)
    for call in ("fwd", "bwd"):  # the same map, in place, for both
        seen = backend_spy[f"{call}_block_map"]
        assert isinstance(seen, dmattn_cupy.BlockMap) and seen.bits.data.ptr == bm.data_ptr(), call
    out_plain, grads_plain = run(None)
    assert backend_spy["fwd_block_map"] is None and backend_spy["bwd_block_map"] is None
    torch.testing.assert_close(out, out_plain, rtol=0, atol=0)
    for got, want in zip(grads, grads_plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = torch_attention(*(t.double() for t in (q, k, v)), mask, bias.double(), causal=True)
    assert rel_error(out, ref) <= 2e-2


# ---------------------------------------------------------------------------------------------
# Accuracy against float64 math on the CPU


CASES = {
    "gqa_causal_kv_bias_topk_mask": dict(batch=2, seqlen_q=256, seqlen_k=256, heads=8,
                                         kv_heads=2, head_dim=64, causal=True,
                                         bias=(2, 2, 256, 256), mask=(2, 2, 256, 256)),
    "sq_ne_sk_broadcast_bias_row_mask": dict(batch=1, seqlen_q=100, seqlen_k=300, heads=4,
                                             kv_heads=4, head_dim=128, causal=True,
                                             bias=(1, 1, 100, 300), mask=(1, 1, 1, 300)),
    "decode_softcap": dict(batch=3, seqlen_q=1, seqlen_k=77, heads=4, kv_heads=1,
                           head_dim=32, causal=False, softcap=20.0, bias=(3, 1, 1, 77),
                           mask=None),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", ["same", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_half_gradients_match_float64_cpu_math(case, dtype, bias_dtype):
    c = CASES[case]
    q = randn(c["batch"], c["seqlen_q"], c["heads"], c["head_dim"], dtype=dtype, seed=11)
    k = randn(c["batch"], c["seqlen_k"], c["kv_heads"], c["head_dim"], dtype=dtype, seed=12)
    v = randn(c["batch"], c["seqlen_k"], c["kv_heads"], c["head_dim"], dtype=dtype, seed=13)
    bias = randn(*c["bias"], dtype=dtype if bias_dtype == "same" else torch.float32, seed=14)
    mask = None
    if c["mask"] is not None:  # keep the 3/4 largest bias entries of each row (dynamic mask)
        scores = randn(*c["mask"], dtype=torch.float32, seed=15)
        mask = scores >= scores.quantile(0.25, dim=-1, keepdim=True)
    dout = randn(c["batch"], c["seqlen_q"], c["heads"], c["head_dim"], dtype=dtype, seed=16)
    options = dict(causal=c["causal"], softcap=c.get("softcap", 0.0))

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = flash_dmattn_func(*leaves[:3], attn_mask=mask, attn_bias=leaves[3],
                            is_causal=options["causal"], softcap=options["softcap"])
    out.backward(dout)

    ref_leaves = [t.detach().cpu().to(F64).requires_grad_(True) for t in (q, k, v, bias)]
    ref = torch_attention(*ref_leaves[:3], None if mask is None else mask.cpu(), ref_leaves[3],
                          **options)
    ref.backward(dout.cpu().to(F64))

    limit = 1e-2 if dtype == torch.float16 else 5e-2
    assert out.dtype == dtype and leaves[3].grad.dtype == bias.dtype
    assert rel_error(out, ref) <= limit
    for name, got, want in zip("q k v bias".split(), leaves, ref_leaves):
        assert rel_error(got.grad, want.grad) <= limit, name


def test_float32_cuda_tensors_are_refused_with_a_type_error():
    q = randn(1, 16, 2, 64, dtype=torch.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        flash_dmattn_func(q, q, q)


# ---------------------------------------------------------------------------------------------
# Training and torch.compile


class BiasedAttention(torch.nn.Module):
    """A small attention layer with a learnable (1, H, S, S) bias; `attend` picks the math."""

    def __init__(self, dim=64, heads=4, head_dim=32, seqlen=64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(dim, 3 * heads * head_dim)
        self.bias = torch.nn.Parameter(torch.zeros(1, heads, seqlen, seqlen))
        self.out = torch.nn.Linear(heads * head_dim, dim)

    def forward(self, x, attend):
        batch, seqlen, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, 3, self.heads, self.head_dim).unbind(2)
        o = attend(q, k, v, self.bias.expand(batch, -1, -1, -1))
        return self.out(o.reshape(batch, seqlen, -1))


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 3e-2), (torch.bfloat16, 6e-2)])
def test_training_loss_follows_plain_torch(dtype, rtol):
    torch.manual_seed(0)
    teacher = BiasedAttention().to(CUDA)
    with torch.no_grad():
        teacher.bias.copy_(torch.randn_like(teacher.bias))
    x = torch.randn(8, 64, 64, device=CUDA)
    with torch.no_grad():
        target = teacher(x, lambda q, k, v, b: torch_attention(q, k, v, bias=b, causal=True))

    def ours(q, k, v, b):  # half q/k/v, float32 bias, float32 result
        return flash_dmattn_func(q.to(dtype), k.to(dtype), v.to(dtype), attn_bias=b,
                                 is_causal=True).float()

    def reference(q, k, v, b):
        return torch_attention(q, k, v, bias=b, causal=True)

    student = BiasedAttention().to(CUDA)
    losses = {}
    for name, attend in (("ours", ours), ("reference", reference)):
        model = copy.deepcopy(student)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x, attend), target)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
        assert model.bias.grad is not None and model.bias.grad.abs().sum() > 0
    assert losses["ours"][-1] < 0.5 * losses["ours"][0]
    for step, (got, want) in enumerate(zip(losses["ours"], losses["reference"])):
        assert abs(got - want) <= rtol * want, (step, got, want)


def test_compile_fullgraph_on_cuda():
    torch.manual_seed(0)
    model = BiasedAttention().to(CUDA)

    def attend(q, k, v, b):
        return flash_dmattn_func(q.to(torch.bfloat16), k.to(torch.bfloat16),
                                 v.to(torch.bfloat16), attn_bias=b, is_causal=True).float()

    x = torch.randn(2, 64, 64, device=CUDA)
    compiled = torch.compile(lambda x: model(x, attend), fullgraph=True)
    y = compiled(x)
    y.square().mean().backward()
    grad_compiled = model.bias.grad.clone()
    model.zero_grad()
    y_eager = model(x, attend)
    y_eager.square().mean().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grad_compiled, model.bias.grad, rtol=5e-2, atol=1e-4)
