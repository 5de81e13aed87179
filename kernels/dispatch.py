"""One entry point per op: Triton on CUDA tensors, the plain-torch reference elsewhere.

``VPRUNE_KERNELS=torch|triton`` forces one implementation (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before import).
"""
from __future__ import annotations

import os

import torch

from .gather import gather_rows_reference
from .select import select_topk_reference


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor, honouring VPRUNE_KERNELS."""
    forced = os.environ.get("VPRUNE_KERNELS", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced:
        raise ValueError(f"VPRUNE_KERNELS={forced!r} is invalid: allowed 'torch', 'triton' or unset")
    return "torch"


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of each row of ``scores`` [B, N]: int64 [B, k] in ascending index order, ties to the
    lower index, NaN ranked below every number."""
    return select_topk_reference(scores, k)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows ``idx`` [B, k] of ``x`` along token axis ``dim`` ([B, N, D] -> [B, k, D];
    [B, H, N, Dh] with dim=2 -> [B, H, k, Dh])."""
    return gather_rows_reference(x, idx, dim)
