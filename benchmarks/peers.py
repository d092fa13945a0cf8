"""Every implementation under test, as callables on one shared set of GPU inputs.

Implementations (``Impl.name``):

- ``dmattn_cupy``    this project, called through its CuPy API on zero-copy views of the torch
                     tensors, on torch's current stream. Full semantics (bias, mask, causal).
- ``sdpa_flash``     torch SDPA, FLASH_ATTENTION backend, causal, no bias and no mask.
- ``sdpa_cudnn``     torch SDPA, CUDNN_ATTENTION backend, causal, no bias and no mask.
- ``sdpa_efficient`` torch SDPA, EFFICIENT_ATTENTION backend with mask & causal & bias folded into
                     one additive float mask (H heads); K/V repeated for GQA where the backend has
                     no enable_gqa.
- ``sdpa_cudnn_bias`` the same additive mask on the CUDNN_ATTENTION backend: the decode target's
                     peer. Its forward + backward asks for dbias too; where cuDNN has no such
                     backward the record carries the error.
- ``flex``           FlexAttention (torch.compile'd) with the bias added in ``score_mod`` and a
                     prebuilt BlockMask from ``mask_mod`` = mask & causal.
- ``flex_build``     the same, building the BlockMask inside every call (what a dynamic mask costs).

``sdpa_flash`` and ``sdpa_cudnn`` compute plain causal attention ("computes": "plain"): they are
the dense reference, checked against a plain causal float64 reference and flagged as computing a
different function whenever the config has a bias or a mask.

Layouts: dmattn_cupy takes (B, S, H, D); the torch peers take their native (B, H, S, D) contiguous
copies of the same values. Every ``fwd`` returns the output as (B, Sq, H, D); every ``fwd_bwd``
returns (dq, dk, dv, dbias or None) in dmattn_cupy's layouts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

from .configs import Config, density_block_keep, expand_block_mask

PEER_NAMES = ("sdpa_flash", "sdpa_cudnn", "sdpa_cudnn_bias", "sdpa_efficient", "flex", "flex_build")
PEER_FAMILIES = ("sdpa", "flex")
OURS = "dmattn_cupy"
#: dmattn_cupy with the mask's BlockMap made once, outside the timed call (dmattn_cupy.block_map),
#: as FlexAttention's BlockMask is prebuilt; forward and backward both read it. Only where there
#: is a mask.
OURS_MAP = "dmattn_cupy_map"
OURS_IMPLS = (OURS, OURS_MAP)


def applies(name: str, cfg: Config) -> bool:
    """Whether implementation `name` runs on cfg (OURS_MAP needs a mask to map)."""
    return name != OURS_MAP or cfg.has_mask

#: "cuda" for benchmarks. "cpu" is the harness self-test mode (tests/test_benchmarks_cpu.py):
#: dmattn_cupy runs its NumPy reference path, every SDPA peer the MATH backend, FlexAttention
#: eager -- numbers mean nothing there, only the plumbing is exercised.
SETTINGS = {"device": "cuda", "flex_eager": False}


def on_cpu() -> bool:
    return SETTINGS["device"] == "cpu"


def synchronize():
    if not on_cpu():
        import torch
        torch.cuda.synchronize()


def select_peers(spec: str) -> list[str]:
    """'sdpa,flex' -> the peer names; families 'sdpa', 'flex' (every peer named family_*, and
    flex itself); exact names; 'none' or ''."""
    out: list[str] = []
    for tok in (t.strip() for t in (spec or "").split(",")):
        if not tok or tok == "none":
            continue
        if tok in PEER_FAMILIES:
            names = [n for n in PEER_NAMES if n.split("_")[0] == tok]
        else:
            names = [n for n in PEER_NAMES if n == tok]
        if not names:
            raise ValueError(f"unknown peer {tok!r}; expected sdpa, flex or one of {PEER_NAMES}")
        out += [n for n in names if n not in out]
    return out


# ---- torch <-> cupy -----------------------------------------------------------------------
def to_cupy(t):
    """Zero-copy CuPy view of a CUDA torch tensor (bf16 through int16 if DLPack refuses it)."""
    import cupy
    import torch
    t = t.detach()
    try:
        return cupy.from_dlpack(t)
    except Exception:
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return cupy.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
        if t.dtype == torch.bool:
            return cupy.from_dlpack(t.view(torch.uint8)).view(cupy.bool_)
        raise


def to_torch(a):
    """Zero-copy torch view of a CuPy array (bf16 through int16 if DLPack refuses it)."""
    import torch
    if a is None:
        return None
    try:
        return torch.from_dlpack(a)
    except Exception:
        name = str(a.dtype)
        if name == "bfloat16":
            import cupy
            return torch.from_dlpack(a.view(cupy.int16)).view(torch.bfloat16)
        if name == "bool":
            import cupy
            return torch.from_dlpack(a.view(cupy.uint8)).view(torch.bool)
        raise


def as_torch(x):
    """torch view of a torch tensor, CuPy or NumPy array (None stays None)."""
    if x is None or type(x).__module__.startswith("torch"):
        return x
    if type(x).__module__.split(".")[0] == "numpy":
        import torch
        return torch.from_numpy(x)
    return to_torch(x)


@contextlib.contextmanager
def on_torch_stream():
    """Run CuPy work on torch's current stream (so torch events and allocator see it ordered)."""
    if on_cpu():
        yield
        return
    import cupy
    import torch
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        yield


# ---- inputs --------------------------------------------------------------------------------
@dataclass
class Inputs:
    cfg: Config
    q: object  # torch (B, Sq, H, D) bf16
    k: object
    v: object
    dout: object
    bias: object | None  # torch (B, Hk, Sq, Sk) bf16
    mask: object | None  # torch bool (B, Hk, Sq, Sk), includes causal
    mask_ms: float | None = None  # topk_mask time (None for masks not built by topk_mask)
    density: float = 1.0  # kept fraction of causally visible pairs
    extra: dict = field(default_factory=dict)


def causal_keep_torch(sq: int, sk: int, device):
    import torch
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def build_mask(cfg: Config, bias, time_it: bool = False):
    """The config's mask as a torch bool tensor (B, Hk, Sq, Sk) on bias's device, & causal.

    topk / topk_block: ``dmattn_cupy.topk_mask`` on the GPU (CuPy view of the bias).
    density: :func:`benchmarks.configs.density_block_keep` expanded on the GPU.
    Returns (mask, topk_ms or None).
    """
    import torch
    if cfg.mask == "none":
        return None, None
    if cfg.mask == "density":
        blocks = density_block_keep(cfg.batch, cfg.kv_heads, cfg.seqlen_q, cfg.seqlen_k,
                                    cfg.density, cfg.block, cfg.seed)
        blocks = torch.from_numpy(blocks).to(SETTINGS["device"])
        return expand_block_mask(blocks, cfg.seqlen_q, cfg.seqlen_k, cfg.block), None
    import dmattn_cupy as dm
    from .timing import few_ms
    bc = bias.float().numpy() if on_cpu() else to_cupy(bias)
    block = cfg.block if cfg.mask == "topk_block" else None

    def run():
        with on_torch_stream():
            return dm.topk_mask(bc, cfg.window, causal=cfg.causal, block=block)

    mc = run()
    ms = None
    if time_it:
        ms = few_ms(run, n=3)
    mask = as_torch(mc)  # already & causal: topk_mask never keeps a hidden key, smoothed or not
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.contiguous(), ms


def make_inputs(cfg: Config, seed: int = 0, time_mask: bool = False) -> Inputs:
    """Random bf16 q, k, v, dout, bias (randn) and the config's mask, on the GPU."""
    import torch
    from .configs import mask_density
    device = SETTINGS["device"]
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)

    q, k, v = randn(cfg.q_shape), randn(cfg.kv_shape), randn(cfg.kv_shape)
    dout = randn(cfg.q_shape)
    bias = randn(cfg.bias_shape) if cfg.has_bias else None
    mask, ms = build_mask(cfg, bias, time_it=time_mask) if cfg.has_mask else (None, None)
    density = 1.0
    if mask is not None:
        density = mask_density(mask, cfg.seqlen_q, cfg.seqlen_k, cfg.causal)
    from .timing import free_memory
    free_memory()
    return Inputs(cfg, q, k, v, dout, bias, mask, ms, density)


# ---- implementations ------------------------------------------------------------------------
@dataclass
class Impl:
    name: str
    computes: str  # "full" (bias, mask, causal) or "plain" (causal only)
    fwd: Callable
    fwd_bwd: Callable
    input_bytes: int
    ctx: Callable = contextlib.nullcontext
    has_bias_grad: bool = False
    notes: str = ""


def _leaf(t, grad: bool):
    return t.detach().clone().requires_grad_(grad) if t is not None else None


def make_ours(inp: Inputs, with_map: bool = False):
    """Impl of dmattn_cupy; with_map: (Impl of OURS_MAP, the map's build function)."""
    import torch

    import dmattn_cupy as dm
    from .timing import tensor_bytes
    cfg = inp.cfg
    if on_cpu():  # NumPy reference path on float32 copies (harness self-test)
        def conv(t):
            return None if t is None else (t.numpy() if t.dtype == torch.bool else
                                           t.detach().float().numpy())
    else:
        def conv(t):
            return None if t is None else to_cupy(t)
    qc, kc, vc, doc = (conv(t) for t in (inp.q, inp.k, inp.v, inp.dout))
    bc, mc = conv(inp.bias), conv(inp.mask)

    def build():
        with on_torch_stream():
            return dm.block_map(mc)

    block_map = build() if with_map else None

    def fwd():  # CuPy out; as_torch() converts it for the checks, outside the timed calls
        return dm.forward(qc, kc, vc, mc, bc, causal=cfg.causal, block_map=block_map)

    def fwd_bwd():
        out, lse = dm.forward(qc, kc, vc, mc, bc, causal=cfg.causal, return_lse=True,
                              block_map=block_map)
        return dm.backward(doc, qc, kc, vc, out, lse, mc, bc, causal=cfg.causal, block_map=block_map)

    nbytes = tensor_bytes(inp.q, inp.k, inp.v, inp.bias, inp.mask)
    if not with_map:
        return Impl(OURS, "full", fwd, fwd_bwd, nbytes, ctx=on_torch_stream,
                    has_bias_grad=inp.bias is not None)
    impl = Impl(OURS_MAP, "full", fwd, fwd_bwd, nbytes + block_map.bits.nbytes, ctx=on_torch_stream,
                has_bias_grad=inp.bias is not None,
                notes="BlockMap made once by dmattn_cupy.block_map, outside the timed calls")
    return impl, build


def _sdpa_causal_flag(cfg: Config) -> bool:
    """SDPA's is_causal is top-left aligned: right for Sq == Sk; Sq == 1 sees every key."""
    if not cfg.causal or cfg.seqlen_q == 1:
        return False
    if cfg.seqlen_q == cfg.seqlen_k:
        return True
    raise NotImplementedError("SDPA is_causal is top-left aligned; Sq != Sk needs a mask")


def _bhsd(t, grad):
    return t.detach().transpose(1, 2).contiguous().requires_grad_(grad)


def _grads_to_ours(dq, dk, dv, dbias=None):
    return (dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dbias)


_SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                  "sdpa_cudnn_bias": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}


def _sdpa_context(name: str) -> Callable:
    """sdpa_kernel restricted to the peer's backend (MATH in the CPU self-test)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.MATH if on_cpu() else getattr(SDPBackend, _SDPA_BACKENDS[name])
    return lambda: sdpa_kernel(backend)


def _gqa_sdpa(q, k, v, group: int, ctx: Callable, probe_mask=None, **kwargs):
    """(attend, repeated): attend(attn_mask) is SDPA on q, k, v with ``kwargs``. For GQA it passes
    enable_gqa where the backend takes it (one probe call under ctx, with probe_mask), else it
    repeats K/V to every query head inside each call."""
    import torch
    import torch.nn.functional as F
    state = {"repeat": False}

    def attend(attn_mask=None):
        if group > 1 and state["repeat"]:
            kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=group > 1,
                                              **kwargs)

    if group > 1:
        try:
            with ctx(), torch.no_grad():
                attend(probe_mask)
        except RuntimeError:
            state["repeat"] = True
    return attend, state["repeat"]


def make_sdpa_plain(inp: Inputs, name: str) -> Impl:
    import torch
    from .timing import tensor_bytes
    cfg = inp.cfg
    q, k, v = (_bhsd(t, True) for t in (inp.q, inp.k, inp.v))
    dout = inp.dout.transpose(1, 2).contiguous()
    ctx = _sdpa_context(name)
    attend, repeated = _gqa_sdpa(q, k, v, cfg.group, ctx, is_causal=_sdpa_causal_flag(cfg))

    def fwd():
        with torch.no_grad():
            return attend().transpose(1, 2)

    def fwd_bwd():
        out = attend()
        return _grads_to_ours(*torch.autograd.grad(out, (q, k, v), dout))

    notes = "causal only (no bias, no mask)" + ("; K/V repeated" if repeated else "")
    return Impl(name, "plain", fwd, fwd_bwd, tensor_bytes(q, k, v), ctx=ctx, notes=notes)


def make_sdpa_bias(inp: Inputs, name: str) -> Impl:
    """SDPA (efficient or cuDNN backend) with mask & causal & bias folded into one additive mask of
    H heads: bias where kept, -inf where hidden. Forward + backward asks for dbias as well."""
    import torch
    from .timing import tensor_bytes
    cfg = inp.cfg
    group = cfg.group
    q, k, v = (_bhsd(t, True) for t in (inp.q, inp.k, inp.v))
    dout = inp.dout.transpose(1, 2).contiguous()
    bias = _leaf(inp.bias, True)
    use_additive = inp.bias is not None or inp.mask is not None
    if use_additive:
        keep = None
        if cfg.causal and cfg.seqlen_q > 1:
            keep = causal_keep_torch(cfg.seqlen_q, cfg.seqlen_k, q.device)
        if inp.mask is not None:
            keep = inp.mask if keep is None else inp.mask & keep
        is_causal = False
    else:
        keep = None
        is_causal = _sdpa_causal_flag(cfg)
    shape = cfg.bias_shape

    def additive(b):
        neg_inf = torch.tensor(float("-inf"), dtype=torch.bfloat16, device=q.device)
        base = b if b is not None else torch.zeros((), dtype=torch.bfloat16, device=q.device)
        add = torch.where(keep, base, neg_inf) if keep is not None else base.expand(shape)
        add = add.expand(shape)
        if group > 1:
            add = add.repeat_interleave(group, 1)
        return add

    pre = additive(bias.detach() if bias is not None else None) if use_additive else None
    ctx = _sdpa_context(name)
    attend, repeated = _gqa_sdpa(q, k, v, group, ctx, probe_mask=pre, is_causal=is_causal)

    def fwd():
        with torch.no_grad():
            return attend(pre).transpose(1, 2)

    def fwd_bwd():
        add = additive(bias) if use_additive else None
        out = attend(add)
        if bias is not None:
            dq, dk, dv, db = torch.autograd.grad(out, (q, k, v, bias), dout)
            return _grads_to_ours(dq, dk, dv, db)
        return _grads_to_ours(*torch.autograd.grad(out, (q, k, v), dout))

    notes = "mask & causal & bias as one additive mask" + ("; K/V repeated" if repeated else "")
    return Impl(name, "full", fwd, fwd_bwd, tensor_bytes(q, k, v, pre), ctx=ctx,
                has_bias_grad=bias is not None, notes=notes)


_FLEX = {}


def _flex_compiled():
    """torch.compile(flex_attention) built once per process (recompiles per shape)."""
    if on_cpu() or SETTINGS["flex_eager"]:
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention
    if "fn" not in _FLEX:
        import torch
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                    "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def make_flex_mods(cfg: Config, mask, bias):
    """(mask_mod, score_mod or None) reading the mask / bias tensors (kv head = h // group)."""
    group = cfg.group
    offset = cfg.seqlen_k - cfg.seqlen_q
    causal = cfg.causal

    if mask is not None and causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx + offset >= kv_idx) & mask[b, h // group, q_idx, kv_idx]
    elif mask is not None:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask[b, h // group, q_idx, kv_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h // group, q_idx, kv_idx]
    return mask_mod, score_mod


def make_flex(inp: Inputs, build: bool) -> tuple[Impl, Callable]:
    """FlexAttention impl, and a callable that builds the BlockMask (for the mask-cost record)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from .timing import tensor_bytes
    cfg = inp.cfg
    flex = _flex_compiled()
    q, k, v = (_bhsd(t, True) for t in (inp.q, inp.k, inp.v))
    dout = inp.dout.transpose(1, 2).contiguous()
    bias = _leaf(inp.bias, True)
    mask = inp.mask
    mask_mod, score_mod = make_flex_mods(cfg, mask, bias)
    gqa = cfg.group > 1

    def build_block_mask():
        return create_block_mask(mask_mod, cfg.batch, cfg.heads, cfg.seqlen_q, cfg.seqlen_k,
                                 device=q.device, BLOCK_SIZE=128,
                                 _compile=not (on_cpu() or SETTINGS["flex_eager"]))

    state = {}

    def block_mask():
        if build:
            return build_block_mask()
        if "bm" not in state:
            state["bm"] = build_block_mask()
        return state["bm"]

    def attend(bm):
        return flex(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=gqa)

    if on_cpu():  # eager CPU flex refuses inputs that require grad, even under no_grad
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        score_mod_d = make_flex_mods(cfg, mask, inp.bias)[1]

        def attend_fwd(bm):
            return flex(qd, kd, vd, score_mod=score_mod_d, block_mask=bm, enable_gqa=gqa)
    else:
        attend_fwd = attend

    def fwd():
        with torch.no_grad():
            return attend_fwd(block_mask()).transpose(1, 2)

    def fwd_bwd():
        out = attend(block_mask())
        if bias is not None:
            return _grads_to_ours(*torch.autograd.grad(out, (q, k, v, bias), dout))
        return _grads_to_ours(*torch.autograd.grad(out, (q, k, v), dout))

    name = "flex_build" if build else "flex"
    notes = "bias in score_mod, BlockMask from mask & causal" + (
        " built inside every call" if build else " prebuilt")
    return (Impl(name, "full", fwd, fwd_bwd, tensor_bytes(q, k, v, inp.bias, mask),
                 has_bias_grad=bias is not None, notes=notes), build_block_mask)


def make_impl(name: str, inp: Inputs):
    if name == OURS:
        return make_ours(inp)
    if name == OURS_MAP:
        return make_ours(inp, with_map=True)[0]
    if name in ("sdpa_flash", "sdpa_cudnn"):
        return make_sdpa_plain(inp, name)
    if name in ("sdpa_efficient", "sdpa_cudnn_bias"):
        return make_sdpa_bias(inp, name)
    if name in ("flex", "flex_build"):
        return make_flex(inp, build=(name == "flex_build"))[0]
    raise ValueError(f"unknown implementation {name!r}")


# ---- float64 reference ----------------------------------------------------------------------
def reference(inp: Inputs, plain: bool = False, grads: bool = False):
    """Float64 torch attention on the same (bf16-rounded) values; plain = causal only.

    Returns out (B, Sq, H, D) float64, and with grads=True also (dq, dk, dv, dbias|None).
    """
    import torch
    cfg = inp.cfg
    g = cfg.group
    q = inp.q.detach().double().transpose(1, 2).requires_grad_(grads)
    k = inp.k.detach().double().transpose(1, 2).requires_grad_(grads)
    v = inp.v.detach().double().transpose(1, 2).requires_grad_(grads)
    bias = None
    if inp.bias is not None and not plain:
        bias = inp.bias.detach().double().requires_grad_(grads)
    scale = cfg.head_dim ** -0.5
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.repeat_interleave(g, 1)
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    if cfg.causal:
        keep = causal_keep_torch(cfg.seqlen_q, cfg.seqlen_k, s.device)
    keep = keep.expand(s.shape)
    if inp.mask is not None and not plain:
        keep = keep & inp.mask.repeat_interleave(g, 1)
    s = s.masked_fill(~keep, float("-inf"))
    any_row = keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(any_row, s, torch.zeros_like(s)), -1)
    p = torch.where(keep, p, torch.zeros_like(p))
    out = torch.matmul(p, vv)
    out_l = out.transpose(1, 2)
    if not grads:
        return out_l.detach()
    ins = (q, k, v) + ((bias,) if bias is not None else ())
    gr = torch.autograd.grad(out_l, ins, inp.dout.double())
    dq, dk, dv = (x.transpose(1, 2) for x in gr[:3])
    return out_l.detach(), (dq, dk, dv, gr[3] if bias is not None else None)


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (NaN anywhere -> inf)."""
    import torch
    x = x.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    den = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(x - ref).item() / max(den, 1e-30)
