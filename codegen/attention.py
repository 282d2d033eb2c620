"""Multi-head attention whose in/out projections are read from the memory.

``roast_attention`` computes what ``F.multi_head_attention_forward`` computes for
``nn.MultiheadAttention`` without key/value biases, zero attention or static keys,
with the three projections and the output projection as ``roast_linear`` ops, so
neither projection weight is built. The in-projection view V (E, 3E) holds the
q, k and v projections as three column windows: self-attention reads it whole,
cross-attention reads each window on its own (``column_windows``) when the
windows start on hash-tile boundaries, and otherwise slices the full projection.
With ``in_grad_norm`` / ``out_grad_norm`` (``grad_scaling="site"``) the projections'
roast_linear ops normalize their view gradients; only self-attention can, where one
op reads the whole in-projection view. Separate q, k and v weights (``kdim``/``vdim``,
``use_separate_proj_weight``) are sites of their own: one ``roast_linear`` each, each
normalizing its own gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import column_windows, roast_linear


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may not attend) as an additive float mask; float masks pass through."""
    if mask is None or mask.dtype != torch.bool:
        return mask.to(dtype) if mask is not None else None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _in_projection(query, key, value, memory, mapping, scale, bias, embed_dim, grad_norm=False, separate=None):
    """q, k, v: each input through its third of the in-projection, or, with ``separate`` (three (mapping, scale,
    transpose_view, grad_norm): q, k and v projection weights of their own, each a site), through its own
    weight."""
    if separate is not None:
        biases = bias.split(embed_dim) if bias is not None else (None, None, None)
        return tuple(roast_linear(x, memory, list(m), s, b, transpose_view=t, grad_norm=g)
                     for x, (m, s, t, g), b in zip((query, key, value), separate, biases))
    if query is key and key is value:
        return roast_linear(query, memory, mapping, scale, bias, grad_norm=grad_norm).split(embed_dim, dim=-1)
    if grad_norm:
        raise ValueError("in_grad_norm=True needs self-attention (query is key is value): the q, k and v "
                         "projections of distinct inputs are separate ops, each seeing a part of the view's gradient")
    biases = bias.split(embed_dim) if bias is not None else (None, None, None)
    windows = column_windows(mapping, 3)
    if windows is not None:
        return tuple(roast_linear(x, memory, w, scale, b) for x, w, b in zip((query, key, value), windows, biases))
    return tuple(roast_linear(x, memory, mapping, scale, bias)[..., i * embed_dim:(i + 1) * embed_dim]
                 for i, x in enumerate((query, key, value)))


def roast_attention(query, key, value, num_heads: int, memory, in_mapping: list[int], in_scale: float,
                    in_proj_bias, out_mapping: list[int], out_scale: float, out_proj_bias, dropout_p: float = 0.0,
                    training: bool = True, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                    average_attn_weights: bool = True, in_grad_norm: bool = False, out_grad_norm: bool = False,
                    separate: tuple | None = None):
    """(attn_output, attn_weights or None), sequence-first as ``F.multi_head_attention_forward``:
    query (L, N, E) or unbatched (L, E); key and value (S, N, E) or (S, E). ``separate``: the q, k and v
    projections' own weights (``use_separate_proj_weight``: nn.MultiheadAttention with kdim/vdim, WavLM), each
    (mapping, scale, transpose_view, grad_norm); in_mapping and in_scale are then unused."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    q, k, v = _in_projection(query, key, value, memory, in_mapping, in_scale, in_proj_bias, embed_dim, in_grad_norm,
                             separate)
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)  # (N*H, L, D)
    k = k.reshape(src_len, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(src_len, bsz * num_heads, head_dim).transpose(0, 1)

    bias = _additive(attn_mask, q.dtype)
    if bias is not None and bias.dim() == 2:
        bias = bias.unsqueeze(0)  # (1, L, S), the same for every batch element and head
    padding = _additive(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.reshape(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1,
                                                                                             src_len)
        bias = padding if bias is None else bias + padding

    if need_weights:
        scores = torch.bmm(q * (1.0 / math.sqrt(head_dim)), k.transpose(1, 2))
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1)
        if training and dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)
    else:  # no weights to return: torch's fused attention (flash / memory-efficient kernels where they apply)
        four_d = (bsz, num_heads, -1, head_dim)
        mask = None if bias is None else bias.reshape(bsz, num_heads, -1, src_len) if bias.shape[0] > 1 else bias
        out = F.scaled_dot_product_attention(q.reshape(four_d), k.reshape(four_d), v.reshape(four_d), attn_mask=mask,
                                             dropout_p=dropout_p if training else 0.0).flatten(0, 1)
    out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    out = roast_linear(out, memory, out_mapping, out_scale, out_proj_bias,
                       grad_norm=out_grad_norm).reshape(tgt_len, bsz, -1)
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.reshape(bsz, num_heads, tgt_len, src_len)
    if average_attn_weights:
        weights = weights.mean(dim=1)
    return out, weights if batched else weights.squeeze(0)


def roast_encoder_layer(src, num_heads: int, memory, qkv: tuple, qkv_bias, proj: tuple, proj_bias, use_gelu: bool,
                        norm_first: bool, eps: float, norm1_weight, norm1_bias, norm2_weight, norm2_bias, ffn1: tuple,
                        ffn1_bias, ffn2: tuple, ffn2_bias):
    """``torch._transformer_encoder_layer_fwd`` (nn.TransformerEncoderLayer's inference fast path, batch
    first, no mask) with its four weights read from the memory; each weight is (mapping, scale)."""
    embed_dim = src.shape[-1]

    def attention(x):
        seq_first = x.transpose(0, 1) if x.dim() == 3 else x
        out, _ = roast_attention(seq_first, seq_first, seq_first, num_heads, memory, *qkv, qkv_bias, *proj,
                                 proj_bias, 0.0, False, None, False, None, True)
        return out.transpose(0, 1) if x.dim() == 3 else out

    def feed_forward(x):
        hidden = roast_linear(x, memory, *ffn1, ffn1_bias, "none")
        hidden = F.gelu(hidden) if use_gelu else torch.relu(hidden)
        return roast_linear(hidden, memory, *ffn2, ffn2_bias)

    def norm1(x):
        return F.layer_norm(x, (embed_dim,), norm1_weight, norm1_bias, eps)

    def norm2(x):
        return F.layer_norm(x, (embed_dim,), norm2_weight, norm2_bias, eps)

    if norm_first:
        x = src + attention(norm1(src))
        return x + feed_forward(norm2(x))
    x = norm1(src + attention(src))
    return norm2(x + feed_forward(x))
