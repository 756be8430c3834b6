"""ESM-2's forward paths over fair-esm's `ESM2` weights (used as they are), besides fair-esm's own; ESM C's
(`esmc.ESMC`) are the same two paths: its blocks give their own `qkv` and `out`, it has no token dropout, no
embedding scale, and its last norm is `transformer.norm` (`_embed`, `_final_norm`).

- `esm2_forward_sdpa`: padded tokens through `scaled_dot_product_attention` with ESM-2's rotary embeddings
  (flash / memory-efficient kernels on CUDA); equal to fair-esm's forward to 1e-5 in fp32 (tests/test_models.py).
- `esm2_forward_varlen`: the *packed* batch (no padding tokens), all sequences concatenated into one [T, D]
  sequence with cumulative sequence lengths; attention through `torch.nn.attention.varlen.varlen_attn`
  (FlashAttention) on CUDA in bf16/fp16 and through one SDPA per sequence elsewhere (tests/test_esm_varlen.py).
Both take a layer function (`sdpa_layer`, `varlen_layer_fn()`, or their `torch.compile`d versions) and
activation checkpointing.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ... import sharding
from .architecture import family_of_module


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(length: int, inv_freq: torch.Tensor, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(length, device=inv_freq.device, dtype=inv_freq.dtype)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _is_esmc(model) -> bool:
    return family_of_module(model) == "ESM C"


def _inv_freq(model) -> torch.Tensor:
    """The rotary embeddings' inverse frequencies [hd / 2] (one set for every layer)."""
    return model.inv_freq if _is_esmc(model) else model.layers[0].self_attn.rot_emb.inv_freq


def _final_norm(model, x: torch.Tensor) -> torch.Tensor:
    return model.transformer.norm(x) if _is_esmc(model) else model.emb_layer_norm_after(x)


def _qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries, keys and values [..., T, H, hd] of one ESM-2 layer (or an ESM C block, its `qkv`) for tokens
    x [..., T, D], rotary embeddings applied (`cos`, `sin` [T, 1, hd]: each token's position)."""
    if hasattr(layer, "qkv"):
        return layer.qkv(x, cos, sin)
    attn = layer.self_attn
    shape = (*x.shape[:-1], attn.num_heads, x.shape[-1] // attn.num_heads)
    h = layer.self_attn_layer_norm(x)
    q, k, v = (projection(h).view(shape) for projection in (attn.q_proj, attn.k_proj, attn.v_proj))
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _layer_out(layer, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The layer's output from its input x [..., T, D] and the attention output h [..., T, H, hd]: the output
    projection, the residual, then the feed-forward with its residual (an ESM C block: its `out`)."""
    if hasattr(layer, "out"):
        return layer.out(x, h)
    x = x + layer.self_attn.out_proj(h.reshape(x.shape))
    return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))


def sdpa_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One ESM-2 transformer layer on padded tokens (pre-norm attention with rotary embeddings, then the
    feed-forward).

    Args:
        layer: a fair-esm `TransformerLayer`.
        x: [B, T, D] tokens.
        cos, sin: [T, 1, hd] the rotary embeddings of each position.
        attn_mask: [B, 1, 1, T] bool, False on padding; None without padding.
    Returns:
        [B, T, D]
    """
    q, k, v = (t.transpose(1, 2) for t in _qkv(layer, x, cos, sin))  # [B, H, T, hd]
    h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return _layer_out(layer, x, h.transpose(1, 2))


def esm2_forward_sdpa(model, tokens: torch.Tensor, repr_layer: int, padding_idx: int, mask_idx: int,
                      checkpoint: bool = False, layer_fn=sdpa_layer) -> torch.Tensor:
    """ESM-2 (or ESM C) representations of layer `repr_layer` through `scaled_dot_product_attention`.

    Args:
        model: a fair-esm `ESM2` (its weights are used as they are) or an `esmc.ESMC`.
        tokens: [B, T] token ids, `<cls>` ... `<eos>` then padding.
        checkpoint: recompute each layer's activations in the backward pass instead of keeping them
            (activation checkpointing: memory per layer drops to its input, for one extra forward).
        layer_fn: the function computing one layer (`sdpa_layer`, or a `torch.compile`d version of it).
    Returns:
        [B, T, D]; the last layer's output goes through `emb_layer_norm_after`, as in fair-esm (ESM C:
        `transformer.norm`).
    """
    padding = tokens.eq(padding_idx)  # [B, T]
    if _is_esmc(model):
        x = model.embed(tokens)
    else:
        x = model.embed_scale * model.embed_tokens(tokens)
        if model.token_dropout:
            is_mask = tokens.eq(mask_idx)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            lengths = (~padding).sum(-1)
            mask_ratio_observed = is_mask.sum(-1).to(x.dtype) / lengths
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
        x = x * (~padding).unsqueeze(-1).to(x.dtype)
    attn_mask = None if not padding.any() else (~padding)[:, None, None, :]
    cos = sin = None
    if repr_layer:
        cos, sin = (t.unsqueeze(1) for t in _rotary(tokens.shape[1], _inv_freq(model), x.dtype))  # [T, 1, hd]
    return _run_layers(model, x, repr_layer, checkpoint, layer_fn, cos, sin, attn_mask)


def _run_layers(model, x: torch.Tensor, repr_layer: int, checkpoint: bool, layer_fn, *layer_args) -> torch.Tensor:
    """x through the first `repr_layer` layers (`layer_fn(layer, x, *layer_args)`, recomputed in the backward
    pass with `checkpoint`), then the last norm when that is the last layer, as in fair-esm."""
    checkpoint = checkpoint and torch.is_grad_enabled()
    for layer in model.layers[:repr_layer]:  # a layer sharded under engine.strategy: fsdp gathers its weights
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(sharding.call, layer, layer_fn, x, *layer_args, use_reentrant=False)
        else:
            x = sharding.call(layer, layer_fn, x, *layer_args)
    if repr_layer == len(model.layers):
        x = _final_norm(model, x)
    return x


@functools.lru_cache(maxsize=None)
def varlen_kernel():
    """`torch.nn.attention.varlen.varlen_attn`, or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # FlashAttention 2: Ampere and newer


def varlen_kernel_dtype(q: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype in which `varlen_attention` runs FlashAttention's variable-length kernel on `q`, or None when it
    runs the reference instead. The kernel runs on a CUDA GPU of compute capability 8.0 or newer, in bf16/fp16
    (q's own dtype, else the active CUDA autocast dtype), head size a multiple of 8 up to 256, with a torch that
    has `varlen_attn`. fp32 without autocast runs the reference, exact in fp32 (FlashAttention has no fp32 kernel,
    and a silent cast to bf16 would change the numbers a fp32 run asked for).

    Args:
        q: [T, H, hd] queries.
    """
    if not q.is_cuda or q.shape[-1] % 8 or q.shape[-1] > 256 or varlen_kernel() is None:
        return None
    if not _flash_capable(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        return None
    half = (torch.float16, torch.bfloat16)
    if q.dtype in half:
        return q.dtype
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half:
        return torch.get_autocast_dtype("cuda")
    return None


def uses_varlen_kernel(q: torch.Tensor) -> bool:
    """Whether `varlen_attention` runs FlashAttention's variable-length kernel (see `varlen_kernel_dtype`).

    Args:
        q: [T, H, hd] queries.
    """
    return varlen_kernel_dtype(q) is not None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     lengths: Tuple[int, ...]) -> torch.Tensor:
    """Bidirectional attention of each packed sequence over itself only.

    Args:
        q, k, v: [T, H, hd] the tokens of all sequences, one after the other (rotary embeddings applied).
        cu_seqlens: [S + 1] int32, sequence s holds tokens cu_seqlens[s] .. cu_seqlens[s + 1] - 1.
        max_len: the longest sequence; lengths: the S sequence lengths (host ints).
    Returns:
        [T, H, hd]. On CUDA in bf16/fp16 (see `varlen_kernel_dtype`) FlashAttention's variable-length kernel,
        under autocast in the autocast dtype (autocast does not reach this custom op, so the cast is made here).
        Otherwise the reference: `scaled_dot_product_attention` on each sequence alone, so no FLOP goes to
        padding and the result equals the padded path's to rounding.
    """
    dtype = varlen_kernel_dtype(q)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return varlen_kernel()(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    # [1, H, L_s, hd] per sequence: 4-d inputs reach the fused kernels (3-d ones fall back to the math path on CPU)
    outputs = [F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs)))
               for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(outputs, dim=2)[0].transpose(0, 1)


def varlen_layer_fn(compile: bool = False):
    """The function computing one ESM-2 layer on packed tokens: `fn(layer, x [T, D], cos, sin [T, 1, hd] at
    each token's position within its own sequence, cu_seqlens, max_len, lengths) -> [T, D]`.

    With `compile`, the dense parts before and after attention go through `torch.compile`; attention stays
    outside, so the compiled graphs never see the number or lengths of the sequences and do not recompile for
    every new batch composition.
    """
    qkv, out = (torch.compile(_qkv, dynamic=True), torch.compile(_layer_out, dynamic=True)) if compile \
        else (_qkv, _layer_out)

    def layer_fn(layer, x, cos, sin, cu_seqlens, max_len, lengths):
        q, k, v = qkv(layer, x, cos, sin)
        return out(layer, x, varlen_attention(q, k, v, cu_seqlens, max_len, lengths))

    return layer_fn


_varlen_layer = varlen_layer_fn()


def esm2_forward_varlen(model, tokens: torch.Tensor, cu_seqlens: torch.Tensor, repr_layer: int, mask_idx: int,
                        checkpoint: bool = False, layer_fn=_varlen_layer) -> torch.Tensor:
    """ESM-2 (or ESM C) representations of layer `repr_layer` on packed sequences, no padding anywhere.

    Equal to `esm2_forward_sdpa` on the padded batch of the same sequences, row for row: rotary embeddings
    take each token's position within its own sequence (restarting at every `<cls>`), and token dropout
    rescales each sequence by its own length and `<mask>` count, as fair-esm does per row.

    Args:
        model: a fair-esm `ESM2` or an `esmc.ESMC`.
        tokens: [T] token ids of S sequences one after the other, each `<cls>` ... `<eos>`.
        cu_seqlens: [S + 1] int32 cumulative sequence lengths (0, L_1, L_1 + L_2, ..., T).
        checkpoint, layer_fn: as in `esm2_forward_sdpa` (`layer_fn`: `_varlen_layer` or its compiled version).
    Returns:
        [T, D]; the last layer's output goes through `emb_layer_norm_after`, as in fair-esm.
    """
    lengths_tensor = cu_seqlens.diff().long()  # [S]
    lengths = tuple(lengths_tensor.tolist())
    max_len = max(lengths, default=0)
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths_tensor)  # [T]
    position = torch.arange(len(tokens), device=tokens.device) - cu_seqlens[:-1].long()[sequence]  # [T]
    if _is_esmc(model):
        x = model.embed(tokens)
    else:
        x = model.embed_scale * model.embed_tokens(tokens)
    if getattr(model, "token_dropout", False):
        is_mask = tokens.eq(mask_idx)
        x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
        mask_ratio_train = 0.15 * 0.8
        count = torch.zeros_like(lengths_tensor).index_add_(0, sequence, is_mask.long())
        mask_ratio_observed = count.to(x.dtype) / lengths_tensor
        x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[sequence, None]
    cos = sin = None
    if repr_layer:
        cos, sin = _rotary(max_len, _inv_freq(model), x.dtype)
        cos, sin = cos[position].unsqueeze(1), sin[position].unsqueeze(1)  # [T, 1, hd]
    return _run_layers(model, x, repr_layer, checkpoint, layer_fn, cos, sin, cu_seqlens.to(torch.int32), max_len,
                       lengths)

