"""Row gather: the plain-torch reference (index_select on a flat view, never an expanded torch.gather)."""
from __future__ import annotations

import torch


def check_gather_args(x: torch.Tensor, idx: torch.Tensor, dim: int) -> int:
    """Validate and return the (non-negative) token dimension."""
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gather_rows: idx must be an int64/int32 [B, k] tensor, got {idx.dtype} {tuple(idx.shape)}")
    if x.dim() < 2:
        raise ValueError(f"gather_rows: x must have at least 2 dims [B, N, ...], got shape {tuple(x.shape)}")
    d = dim % x.dim()
    if d == 0:
        raise ValueError("gather_rows: dim must not be the batch dimension 0")
    if x.shape[0] != idx.shape[0]:
        raise ValueError(f"gather_rows: batch mismatch: x has {x.shape[0]} rows, idx has {idx.shape[0]}")
    return d


def gather_rows_reference(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x [B, ..., N, ...] (token axis ``dim``), idx [B, k] -> x with the token axis replaced by k rows."""
    d = check_gather_args(x, idx, dim)
    b, n = x.shape[0], x.shape[d]
    xt = x.movedim(d, 1)  # [B, N, *rest]
    rest = xt.shape[2:]
    flat = xt.reshape(b * n, -1)
    offsets = (torch.arange(b, device=idx.device, dtype=torch.int64) * n).unsqueeze(1)
    rows = flat.index_select(0, (idx.to(torch.int64) + offsets).reshape(-1))
    return rows.reshape(b, idx.shape[1], *rest).movedim(1, d)
