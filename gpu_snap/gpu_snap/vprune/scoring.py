"""Token importance scores, computed without ever materialising a full attention matrix.

Attention scores come from recomputing only the needed query rows at the scoring layer
(ALGORITHMS.md section 3): ``softmax(q_rows @ k^T * scale + mask)`` in fp32 for R rows against all N
keys, so SDPA / FlashAttention stay on for every layer. Nothing here knows a host library.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def repeat_kv_heads(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, N, Dh] -> [B, n_heads, N, Dh] for grouped-query attention (no copy when Hkv == n_heads)."""
    hkv = k.shape[1]
    if hkv == n_heads:
        return k
    if n_heads % hkv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({hkv})")
    return k.repeat_interleave(n_heads // hkv, dim=1)


def attention_rows(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention probabilities of a few query rows, in fp32.

    q: [B, H, R, Dh] post-RoPE queries of the rows of interest.
    k: [B, Hkv, N, Dh] post-RoPE keys (GQA heads are repeated to H).
    mask: broadcastable to [B, H, R, N]: bool (True = may attend) or additive float (0 / -inf).
    Returns [B, H, R, N] fp32 probabilities (rows whose keys are all masked give zeros; NaN inputs
    give NaN, which ``vprune.selection`` rejects with a clear error).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D [B, H, R, Dh] / [B, Hkv, N, Dh], got {tuple(q.shape)} and {tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = repeat_kv_heads(k, q.shape[1])
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    probs = torch.softmax(logits, dim=-1)
    if mask is None:  # no key is masked, so no row is fully masked (3 small ops saved per call)
        return probs
    # Only rows whose keys are all masked become zeros; a NaN from the inputs (fp16 overflow, NaN
    # weights) stays NaN so that selection reports it instead of silently scoring zeros.
    all_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return probs.masked_fill(all_masked, 0.0)


def attention_row_scores(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None,
                         row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Importance of every key: attention of the given query rows, averaged over heads and rows.

    row_weights: [B, R] (e.g. 1 for real text rows, 0 for padding); None averages all rows equally.
    Returns [B, N] fp32. With R=1 (the last prompt row) this is FastV's score.
    """
    probs = attention_rows(q, k, mask, scale).mean(dim=1)  # [B, R, N], head mean
    if row_weights is None:
        return probs[:, 0] if probs.shape[1] == 1 else probs.mean(dim=1)  # one row: its own mean
    w = row_weights.to(probs.dtype)
    return (probs * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


def key_norm_scores(k: torch.Tensor) -> torch.Tensor:
    """L2 norm of each key, head-averaged: [B, H, N, Dh] -> [B, N] fp32 (DART's pivot score)."""
    return k.float().norm(dim=-1).mean(dim=1)


def cosine_gram(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity cos(x_i, x_j): [B, N, D] -> [B, N, N] fp32 (x_i / max(||x_i||, 1e-12)
    as ``F.normalize``, then one batched matmul)."""
    if x.dtype != torch.float32:
        x = x.float()
    # F.normalize(x, dim=-1) without its Python wrappers: the same ops
    xn = x / torch.linalg.vector_norm(x, 2, -1, keepdim=True).clamp_min(1e-12)
    if xn.dim() == 3:  # bmm is what matmul runs for [B, N, D] x [B, D, N], without its ~6 view calls
        return torch.bmm(xn, xn.transpose(1, 2))
    return torch.matmul(xn, xn.transpose(-1, -2))


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distance 1 - cos(x_i, x_j): [B, N, D] -> [B, N, N] fp32."""
    return 1.0 - cosine_gram(x)
