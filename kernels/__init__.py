"""vprune.kernels: top-k selection and row gather, Triton on CUDA and plain torch elsewhere.

    select_topk(scores [B, N], k) -> int64 [B, k], ascending token order, ties to the lower index
    gather_rows(x [B, N, D] or [B, H, N, Dh], idx [B, k]) -> the selected rows

This package never imports the rest of vprune.
"""
from .dispatch import gather_rows, select_topk

__all__ = ["select_topk", "gather_rows"]
