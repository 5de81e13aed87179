"""One entry point per op: Triton on CUDA tensors, the plain-torch reference elsewhere.

Routing (read at every call, so tests and users can switch it at run time):
- ``VPRUNE_KERNELS`` unset: Triton for CUDA tensors when Triton imports, the torch reference otherwise.
- ``VPRUNE_KERNELS=torch``: always the reference.
- ``VPRUNE_KERNELS=triton``: always Triton; a clear error if Triton is missing, or if a CPU tensor
  comes without ``TRITON_INTERPRET=1`` set before ``vprune.kernels`` was imported (the interpreter
  is how the Triton code is tested on CPUs).

The ops are also registered as ``torch.ops.vprune.select_topk``, ``torch.ops.vprune.select_topk_per_row``
and ``torch.ops.vprune.gather_rows`` (``torch.library.custom_op`` with fake implementations, and
autograd for gather), so a patched model still traces under ``torch.compile(fullgraph=True)``.
Eager calls skip the op wrapper (its Python dispatch costs several microseconds, comparable to the
kernels themselves) and call the launcher directly; under compilation the public functions emit the op.
Neither path synchronises with the host, so both run inside CUDA-graph capture.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from ._triton import HAS_TRITON, INTERPRET, TRITON_IMPORT_ERROR
from .gather import (check_gather_args, gather_out_shape, gather_rows_reference, gather_rows_triton,
                     gather_rows_triton_unchecked)
from .select import (check_select_args, select_topk_per_row_reference, select_topk_per_row_triton,
                     select_topk_reference, select_topk_triton, select_topk_triton_unchecked)

__all__ = ["select_topk", "select_topk_per_row", "gather_rows", "backend_for", "OPS_REGISTERED"]


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor, honouring VPRUNE_KERNELS."""
    forced = os.environ.get("VPRUNE_KERNELS", "").strip().lower()
    if not forced:
        return "triton" if (HAS_TRITON and t.is_cuda) else "torch"
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"VPRUNE_KERNELS=triton but triton is not importable ({TRITON_IMPORT_ERROR}); "
                               "install triton or unset VPRUNE_KERNELS to use the torch reference")
        if not t.is_cuda and not INTERPRET:
            raise RuntimeError(f"VPRUNE_KERNELS=triton with a {t.device.type} tensor needs TRITON_INTERPRET=1 set "
                               "before vprune.kernels is imported (the Triton interpreter), or a CUDA tensor")
        return "triton"
    raise ValueError(f"VPRUNE_KERNELS={forced!r} is invalid: allowed 'torch', 'triton' or unset")


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
if _is_compiling is None:  # torch < 2.3
    _is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", lambda: False)


# ---- implementations behind both the eager path and the custom ops ---------------------------

def _select_impl(scores: torch.Tensor, k: int) -> torch.Tensor:
    if backend_for(scores) == "triton":
        return select_topk_triton(scores, k)
    return select_topk_reference(scores, k)


def _select_per_row_impl(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    if backend_for(scores) == "triton":
        return select_topk_per_row_triton(scores, k, k_max)
    return select_topk_per_row_reference(scores, k, k_max)


def _gather_impl(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    if backend_for(x) == "triton":
        return gather_rows_triton(x, idx, dim)
    return gather_rows_reference(x, idx, dim).contiguous()


def _gather_backward_torch(grad: torch.Tensor, idx: torch.Tensor, x_shape: Tuple[int, ...], d: int) -> torch.Tensor:
    """d x from d out: scatter-add each gathered row back to its source token (indices outside [0, N)
    contribute nothing, matching the zero rows the Triton path gathers for them)."""
    b, n, k = x_shape[0], x_shape[d], idx.shape[1]
    g = grad.movedim(d, 1).reshape(b * k, -1)
    i = idx.to(torch.int64)
    ok = ((i >= 0) & (i < n)).reshape(-1, 1).to(g.dtype)
    flat = (i.clamp(0, n - 1) + torch.arange(b, device=i.device).unsqueeze(1) * n).reshape(-1)
    moved_shape = (x_shape[0], x_shape[d]) + tuple(s for j, s in enumerate(x_shape) if j not in (0, d))
    gx = torch.zeros((b * n, g.shape[1]), dtype=grad.dtype, device=grad.device).index_add_(0, flat, g * ok)
    return gx.reshape(moved_shape).movedim(1, d)


# ---- torch.library custom ops ----------------------------------------------------------------

OPS_REGISTERED = False
if hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake"):
    try:
        @torch.library.custom_op("vprune::select_topk", mutates_args=())
        def _select_topk_op(scores: torch.Tensor, k: int) -> torch.Tensor:
            return _select_impl(scores, k)

        @_select_topk_op.register_fake
        def _select_topk_fake(scores: torch.Tensor, k: int) -> torch.Tensor:
            return scores.new_empty((scores.shape[0], k), dtype=torch.int64)

        @torch.library.custom_op("vprune::select_topk_per_row", mutates_args=())
        def _select_topk_per_row_op(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
            return _select_per_row_impl(scores, k, k_max)

        @_select_topk_per_row_op.register_fake
        def _select_topk_per_row_fake(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
            return scores.new_empty((scores.shape[0], k_max), dtype=torch.int64)

        @torch.library.custom_op("vprune::gather_rows", mutates_args=())
        def _gather_rows_op(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
            return _gather_impl(x, idx, dim)

        @_gather_rows_op.register_fake
        def _gather_rows_fake(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
            d = dim % x.dim()
            return x.new_empty(gather_out_shape(tuple(x.shape), idx.shape[1], d))

        def _gather_setup_context(ctx, inputs, output) -> None:
            x, idx, dim = inputs
            ctx.save_for_backward(idx)
            ctx.x_shape = tuple(x.shape)
            ctx.d = dim % x.dim()

        def _gather_backward(ctx, grad):
            (idx,) = ctx.saved_tensors
            return _gather_backward_torch(grad, idx, ctx.x_shape, ctx.d), None, None

        _gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)
        OPS_REGISTERED = True
    except RuntimeError as exc:  # the module was imported twice (e.g. importlib.reload): reuse the ops
        if "already" not in str(exc).lower():
            raise
        OPS_REGISTERED = hasattr(torch.ops.vprune, "select_topk")


# ---- public API ---------------------------------------------------------------------------

def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of each row of ``scores`` [B, N] (fp32/fp16/bf16): int64 [B, k] in ascending index order,
    ties to the lower index, NaN ranked below every number (below -inf); -0.0 ties with +0.0."""
    if OPS_REGISTERED and _is_compiling():
        return torch.ops.vprune.select_topk(scores, k)
    check_select_args(scores, k)
    if backend_for(scores) == "triton":
        return select_topk_triton_unchecked(scores, k)
    return select_topk_reference(scores, k)


def select_topk_per_row(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per-row k (k int tensor [B], each in [0, k_max], read on the device): int64 [B, k_max], row b's
    k[b] indices ascending (same order rules as select_topk), then -1 in the unused slots."""
    if OPS_REGISTERED and _is_compiling():
        return torch.ops.vprune.select_topk_per_row(scores, k, k_max)
    check_select_args(scores, k_max)
    return _select_per_row_impl(scores, k, k_max)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows ``idx`` [B, k] of ``x`` along token axis ``dim`` ([B, N, D] -> [B, k, D];
    [B, H, N, Dh] with dim=2 -> [B, H, k, Dh]). Returns a new contiguous tensor; differentiable in x.
    Indices must lie in [0, N) (the Triton path copies zero rows for others, the reference raises)."""
    if OPS_REGISTERED and (_is_compiling() or (x.requires_grad and torch.is_grad_enabled())):
        return torch.ops.vprune.gather_rows(x, idx, dim)
    d = check_gather_args(x, idx, dim)
    if x.requires_grad and torch.is_grad_enabled():  # no custom op (old torch): the differentiable reference
        return gather_rows_reference(x, idx, dim).contiguous()
    if backend_for(x) == "triton":
        return gather_rows_triton_unchecked(x, idx, d)
    return gather_rows_reference(x, idx, dim).contiguous()
