"""vprune.kernels: top-k selection and row gather, Triton on CUDA and plain torch elsewhere.

    select_topk(scores [B, N], k) -> int64 [B, k], ascending token order, ties to the lower index
    select_topk_per_row(scores [B, N], k int [B], k_max) -> int64 [B, k_max], -1 in unused slots
    gather_rows(x [B, N, D] or [B, H, N, Dh], idx [B, k], dim) -> the selected rows, contiguous

Importing this package registers the custom ops ``torch.ops.vprune.{select_topk, select_topk_per_row,
gather_rows}``. It never imports the rest of vprune.
"""
from .dispatch import backend_for, gather_rows, select_topk, select_topk_per_row

__all__ = ["select_topk", "select_topk_per_row", "gather_rows", "backend_for"]
