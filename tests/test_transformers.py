"""dmattn_cupy as a transformers attention implementation (CPU, NumPy reference path).

The end-to-end check is a tiny Doge model (transformers' dynamic-mask-attention model) built
from a config with random weights: logits, gradients and greedy generation with
attn_implementation="dmattn_cupy" match the model's own eager attention.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dmattn_cupy.integrations import transformers as dmt_hf  # noqa: E402

DogeConfig = getattr(transformers, "DogeConfig", None)
DogeForCausalLM = getattr(transformers, "DogeForCausalLM", None)
needs_doge = pytest.mark.skipif(DogeConfig is None, reason="this transformers has no Doge model")


@pytest.fixture(scope="module")
def registered():
    return dmt_hf.register()


def test_register_adds_attention_and_mask_functions(registered):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert registered == "dmattn_cupy"
    assert ALL_ATTENTION_FUNCTIONS[registered] is dmt_hf.flash_dynamic_mask_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[registered] is dmt_hf._mask_without_causal_skip


class _Module(torch.nn.Module):
    def __init__(self, groups, is_causal=True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


def _head_first(batch=2, heads=4, kv_heads=2, seqlen=6, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen)
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["none_causal", "none_bidirectional", "bool", "additive"])
def test_attention_function_matches_sdpa(mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _head_first()
    module = _Module(groups=2, is_causal=mask_kind != "none_bidirectional")
    mask = None
    if mask_kind in ("bool", "additive"):
        mask = torch.tril(torch.ones(6, 6, dtype=torch.bool)).expand(2, 1, 6, 6).clone()
        mask[1, :, :, :2] = False  # left padding in batch 1
        mask[1, :, :2, 0] = True  # keep padding rows non-empty (sdpa would give NaN there)
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    ours, weights = dmt_hf.flash_dynamic_mask_attention_forward(
        module, q, k, v, mask, None, scaling=0.3)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None
    assert ours.shape == expected.shape == (2, 6, 4, 8)  # (B, S, H, D), like sdpa
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_float_mask_and_attention_bias_both_get_gradients():
    q, k, v = _head_first(seed=1)
    module = _Module(groups=2)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(2, 2, 6, 6, generator=gen, requires_grad=True)  # kv-head bias
    additive = torch.randn(2, 1, 6, 6, generator=gen)
    additive = additive.masked_fill(torch.rand(2, 1, 6, 6, generator=gen) < 0.3,
                                    torch.finfo(torch.float32).min)
    additive[..., 0] = 0.0
    additive.requires_grad_(True)
    out, _ = dmt_hf.flash_dynamic_mask_attention_forward(module, q, k, v, additive, bias)
    out.square().sum().backward()

    ref_bias = bias.detach().clone().requires_grad_(True)
    ref_add = additive.detach().clone().requires_grad_(True)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
    scores = scores + ref_bias.repeat_interleave(2, 1) + ref_add
    ref = (torch.softmax(scores, -1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, ref_bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(additive.grad, ref_add.grad, rtol=1e-4, atol=1e-5)


def test_dropout_is_refused():
    q, k, v = _head_first()
    with pytest.raises(NotImplementedError, match="dropout"):
        dmt_hf.flash_dynamic_mask_attention_forward(_Module(2), q, k, v, None, None,
                                                    dropout=0.1)


# ---------------------------------------------------------------------------------------------
# A real model: Doge


def _doge_pair(dtype, registered, hidden_size=32):
    torch.manual_seed(0)
    config = DogeConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        keep_window_size=5, max_position_embeddings=64, pad_token_id=0)
    eager = DogeForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # A = 0 would make the dynamic mask a constant
        for layer in eager.model.layers:
            layer.self_attn.A.copy_(torch.linspace(-1.0, 1.0, config.num_key_value_heads))
    ours = copy.deepcopy(eager)
    eager.set_attn_implementation("eager")
    ours.set_attn_implementation(registered)
    return eager, ours


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    original = dmt_hf.flash_dmattn_func

    def spy(*args, **kwargs):
        calls.append(dict(kwargs, query_shape=tuple(args[0].shape)))
        return original(*args, **kwargs)

    monkeypatch.setattr(dmt_hf, "flash_dmattn_func", spy)
    return calls


@needs_doge
def test_doge_without_attention_mask_stays_causal(registered, count_calls):
    """No attention_mask at all: transformers' sdpa builder would skip the causal mask (leaving
    SDPA's is_causal to apply it); Doge's dynamic mask must still hide the future."""
    eager, ours = _doge_pair(torch.float32, registered)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours(input_ids=ids).logits, eager(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-5)
    assert len(count_calls) == 2


@needs_doge
@pytest.mark.parametrize("dtype,padded", [(torch.float32, True), (torch.float64, False)])
def test_doge_logits_and_gradients_match_eager(registered, count_calls, dtype, padded):
    eager, ours = _doge_pair(dtype, registered)
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    labels = ids.clone()
    if padded:  # left padding; no loss on pad rows or on the logit a pad row produces
        attention_mask[1, :3] = 0
        labels[1, :4] = -100

    result_ours = ours(input_ids=ids, attention_mask=attention_mask, labels=labels)
    result_eager = eager(input_ids=ids, attention_mask=attention_mask, labels=labels)
    assert len(count_calls) == 2  # one call per layer went through dmattn_cupy
    # Doge folds its dynamic mask into a float attention_mask: it arrives as the bias (learnable)
    # plus the hard mask of the positions it hides.
    assert all(c["attn_bias"] is not None and c["attn_mask"].dtype == torch.bool
               for c in count_calls)

    valid = attention_mask.bool()
    # eager Doge runs its softmax in float32 even for a float64 model, hence the tolerances
    torch.testing.assert_close(result_ours.logits[valid], result_eager.logits[valid],
                               rtol=1e-5, atol=1e-6)
    result_ours.loss.backward()
    result_eager.loss.backward()
    checked = 0
    for (name, p_ours), (_, p_eager) in zip(ours.named_parameters(), eager.named_parameters()):
        if p_eager.grad is None:
            continue
        error = (p_ours.grad - p_eager.grad).norm() / p_eager.grad.norm().clamp_min(1e-30)
        assert error < 1e-3, name
        checked += 1
    assert checked > 20
    # the learnable dynamic-mask parameters receive gradient through dmattn_cupy's dbias
    assert ours.model.layers[0].self_attn.A.grad.abs().sum() > 0


@needs_doge
def test_doge_greedy_generation_matches_eager(registered, count_calls):
    eager, ours = _doge_pair(torch.float32, registered)
    ids = torch.randint(1, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        tokens_ours = ours.generate(ids, **options)
        tokens_eager = eager.generate(ids, **options)
    assert tokens_ours.shape == (1, 13)
    # prefill (Sq = 7) then cached decoding steps (Sq = 1, Sk grows): 2 layers each
    assert [c["query_shape"][1] for c in count_calls] == [7, 7] + [1] * 10
    assert torch.equal(tokens_ours, tokens_eager)


@needs_doge
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA and a GPU")
def test_doge_on_cuda_in_bfloat16_tracks_eager(registered, count_calls):
    # Both in bfloat16: Doge picks its top-k keys from bfloat16 scores, so a float32 model
    # keeps other keys and is not a fair yardstick.
    eager, ours = _doge_pair(torch.bfloat16, registered, hidden_size=128)  # head_dim 32
    eager, ours = eager.to("cuda"), ours.to("cuda")
    ids = torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(4)).cuda()
    result_ours = ours(input_ids=ids, labels=ids)
    result_eager = eager(input_ids=ids, labels=ids)
    assert len(count_calls) == 2
    logits_ours, logits_eager = result_ours.logits.float(), result_eager.logits.float()
    assert (logits_ours - logits_eager).norm() < 5e-2 * logits_eager.norm()
    result_ours.loss.backward()
    result_eager.loss.backward()
    for layer_ours, layer_eager in zip(ours.model.layers, eager.model.layers):
        got = layer_ours.self_attn.dt_proj.weight.grad.float()
        want = layer_eager.self_attn.dt_proj.weight.grad.float()
        assert torch.isfinite(got).all()
        assert (got - want).norm() <= 0.1 * want.norm()
