"""Top-k selection: the plain-torch reference (the Triton kernel lives beside it).

Semantics every implementation must match exactly:
- the k highest scores of each row; ties broken toward the lower index;
- NaN ranks below every number (below -inf), NaNs among themselves by index;
- output indices in ascending token order (so gathered tokens keep their original order).
"""
from __future__ import annotations

import torch


def check_select_args(scores: torch.Tensor, k: int) -> None:
    """Shape/dtype/k checks shared by every implementation."""
    if scores.dim() != 2:
        raise ValueError(f"select_topk: scores must be 2-D [B, N], got shape {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"select_topk: scores dtype {scores.dtype} not supported: allowed float32, float16, bfloat16")
    n = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"select_topk: k={k!r} is invalid: allowed an int in [1, N={n}]")


def select_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-torch top-k with the semantics above: int64 [B, k], ascending indices."""
    check_select_args(scores, k)
    s = scores.float()
    nan = torch.isnan(s)
    s = torch.where(nan, torch.full_like(s, float("-inf")), s)
    # Two stable sorts compose into one order: NaN last, then score descending, then index ascending.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    nan_in_order = torch.gather(nan, 1, order).to(torch.uint8)
    order = torch.gather(order, 1, torch.sort(nan_in_order, dim=1, stable=True).indices)
    return torch.sort(order[:, :k], dim=1).values
