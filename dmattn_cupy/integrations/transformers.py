"""dmattn_cupy as a Hugging Face transformers attention implementation.

    from dmattn_cupy.integrations.transformers import register
    register()  # adds "dmattn_cupy" to AttentionInterface and AttentionMaskInterface
    model = DogeForCausalLM.from_pretrained(..., attn_implementation="dmattn_cupy")

``flash_dynamic_mask_attention_forward`` takes what transformers passes to every attention
function (head-first query (B, H, Sq, D), key/value (B, Hk, Sk, D)) and returns
``(attn_output, None)`` with attn_output (B, Sq, H, D), like ``sdpa_attention_forward``.

How transformers' masks are read (the same results as the eager attention):

* ``attention_mask`` bool or integer: nonzero = keep (transformers' sdpa convention).
* ``attention_mask`` float: additive, as in eager attention; entries at or below half the
  dtype's minimum (transformers writes ``finfo(dtype).min`` where a key is hidden) also become a
  hard mask, which lets the kernels skip hidden tiles. The float mask is the bias, so it gets a
  gradient: Doge (transformers' DogeAttention) builds its learnable dynamic mask into this
  ``attention_mask`` and passes no separate ``attention_bias``.
* ``attention_bias`` (flash-dmattn's integration signature): added to the scores; with a float
  ``attention_mask`` the two are summed.
* no mask: causal when the module is causal (``is_causal`` kwarg, else ``module.is_causal``,
  default True) and Sq > 1, as in transformers' sdpa.

One difference from eager attention: a query row with no visible key (only padding rows, whose
outputs transformers ignores) gives 0 where eager gives an average over the hidden keys.
Dropout is not supported (a nonzero ``dropout`` raises NotImplementedError).
"""

from __future__ import annotations

import torch

from dmattn_cupy.torch import flash_dmattn_func

ATTENTION_NAME = "dmattn_cupy"

__all__ = ["ATTENTION_NAME", "flash_dynamic_mask_attention_forward", "register"]


def _keep_mask_of_additive(mask: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask of an additive float mask: hidden where <= finfo(dtype).min / 2."""
    return mask > torch.finfo(mask.dtype).min / 2


def _masks(attention_mask, attention_bias, seqlen_k):
    """(mask, bias) for flash_dmattn_func from transformers' attention_mask/attention_bias."""
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # (B, Sk) padding mask
            attention_mask = attention_mask[:, None, None, :]
        attention_mask = attention_mask[..., :seqlen_k]  # a static cache may be longer
    if attention_bias is not None:
        attention_bias = attention_bias[..., :seqlen_k]
    if attention_mask is None or not attention_mask.is_floating_point():
        return attention_mask, attention_bias
    keep = _keep_mask_of_additive(attention_mask)
    bias = attention_mask if attention_bias is None else attention_bias + attention_mask
    return keep, bias


def flash_dynamic_mask_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    attention_bias: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: head-first inputs, (B, Sq, H, D) output, no weights.

    query (B, H, Sq, D); key, value (B, Hk, Sk, D); attention_mask and attention_bias
    (B|1, H|Hk|1, Sq|1, Sk) (see the module docstring for how they are read). Other keyword
    arguments transformers passes (position_ids, output_attentions, ...) are ignored.
    """
    if dropout:
        raise NotImplementedError(
            f"dmattn_cupy attention has no dropout; got dropout={dropout} (set the model's "
            "attention_dropout to 0 or call model.eval())")
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    mask, bias = _masks(attention_mask, attention_bias, seqlen_k)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(is_causal) and seqlen_q > 1 and attention_mask is None
    out = flash_dmattn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=mask, attn_bias=bias, softmax_scale=scaling, is_causal=causal,
        softcap=softcap)
    return out, None


def register(name: str = ATTENTION_NAME) -> str:
    """Register the attention function (and transformers' sdpa mask builder) under `name`.

    After this, ``attn_implementation=name`` selects dmattn_cupy in any model that dispatches
    through ``ALL_ATTENTION_FUNCTIONS``. The mask builder is needed too: transformers builds
    no attention mask at all for an implementation unknown to ``AttentionMaskInterface``.
    Returns `name`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, flash_dynamic_mask_attention_forward)
    AttentionMaskInterface.register(name, _mask_without_causal_skip)
    return name


def _mask_without_causal_skip(*args, **kwargs):
    """transformers' sdpa mask builder, made to always build the mask.

    For a causal batch without padding, sdpa_mask returns None and lets SDPA apply is_causal;
    Doge then folds its dynamic mask into an attention_mask that has lost the causal part. The
    kernels need the full mask (and skip its hidden tiles anyway)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)
