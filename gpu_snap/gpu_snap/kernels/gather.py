"""Row gather: the plain-torch reference and the Triton row-copy kernel.

``x`` is seen as [B, M, N, R]: batch, the dims between batch and the token axis flattened (M = H
for a K/V cache [B, H, N, Dh] gathered on dim 2, M = 1 for hidden states [B, N, D]), the token axis,
and the trailing dims flattened into one contiguous row of R elements. Each output row is one
contiguous copy of R elements, so the kernel is bound by memory bandwidth:
bytes moved = 2 * B * M * k * R * element size (read once, written once).
Never torch.gather with an expanded index (2.3x slower on an H100: it reads an index per element).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ._launch import FastLauncher, int_class, ptr_class
from ._triton import HAS_TRITON, next_pow2, tl, triton


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


def gather_out_shape(x_shape: Tuple[int, ...], k: int, d: int) -> Tuple[int, ...]:
    """Shape of gather_rows' result: x's shape with the token axis ``d`` replaced by k."""
    return tuple(x_shape[:d]) + (k,) + tuple(x_shape[d + 1:])


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

# Elements per program. H100 sweep (kernels/tune.py, bf16 D=4096, graph device time): 2048 and 4096
# tie (B=64,N=4096,k=1024: 367 us = 0.83x a torch copy_ of the same bytes; B=1,N=576,k=144: 2.1 us),
# 8192 is 1-15% slower, 16384 slower still at small k.
ELEMS_PER_PROGRAM = 4096
# Widest row chunk one program copies; longer rows are split across grid axis 1.
MAX_BLOCK_R = 4096

# Copies move raw bits through an integer view of the same width (no float ops, no bf16 traps).
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


if HAS_TRITON:

    # Row counts and the token count vary per call and gain nothing from specialisation; r and the
    # strides stay specialised (divisibility by 16 lets the copies use 16-byte vector accesses).
    @triton.jit(do_not_specialize=["n_rows", "k", "m", "n"])
    def _gather_rows_kernel(
        x_ptr, idx_ptr, out_ptr, n_rows, k, m, n, r,
        sx_b, sx_m, sx_n, si_b, si_k,
        BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Program (i, j) copies output rows [i*BLOCK_ROWS, +BLOCK_ROWS) x columns [j*BLOCK_R, +BLOCK_R).

        Output rows are numbered over (b, m, slot) with slot fastest; out is contiguous [B, M, k, R].
        Indices outside [0, N) copy zeros (no host-side check: that would need a sync)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        slot = rows % k
        bm = rows // k
        mi = bm % m
        bi = bm // m
        tok = tl.load(idx_ptr + bi * si_b + slot * si_k, mask=row_ok, other=0).to(tl.int64)
        src_ok = row_ok & (tok >= 0) & (tok < n)
        src = bi * sx_b + mi * sx_m + tok * sx_n
        col_ok = cols < r
        v = tl.load(x_ptr + src[:, None] + cols[None, :], mask=src_ok[:, None] & col_ok[None, :], other=0)
        tl.store(out_ptr + rows[:, None] * r + cols[None, :], v, mask=row_ok[:, None] & col_ok[None, :])


def _as_bmnr(x: torch.Tensor, d: int) -> Tuple[torch.Tensor, int, int, int, int, int, int]:
    """View x as [B, M, N, R] strides: returns (x or a contiguous copy, M, R, sx_b, sx_m, sx_n)."""
    shape, strides = x.shape, x.stride()
    mid, rest = shape[1:d], shape[d + 1:]
    m = 1
    for s in mid:
        m *= s
    r = 1
    for s in rest:
        r *= s

    def rest_contiguous() -> bool:
        expect = 1
        for size, st in zip(reversed(rest), reversed(strides[d + 1:])):
            if size != 1 and st != expect:
                return False
            expect *= size
        return True

    def mid_collapsible() -> bool:
        dims = [i for i in range(1, d) if shape[i] != 1]
        return all(strides[a] == strides[b_] * shape[b_] for a, b_ in zip(dims, dims[1:]))

    if not (rest_contiguous() and mid_collapsible()):
        x = x.contiguous()
        strides = x.stride()
    mids = [i for i in range(1, d) if shape[i] != 1]
    sx_m = strides[mids[-1]] if mids else 0
    return x, m, r, strides[0], sx_m, strides[d]


_PLANS: Dict[Tuple[Any, ...], Tuple[Any, ...]] = {}
_LAUNCH = FastLauncher(_gather_rows_kernel) if HAS_TRITON else None


def _plan(x: torch.Tensor, d: int, k: int) -> Tuple[Any, ...]:
    """(x to read, M, R, strides, block sizes, grid, warps) for one call; cached for contiguous x."""
    contiguous = x.is_contiguous()
    ck = (x.shape, d, k, x.element_size(), ELEMS_PER_PROGRAM, MAX_BLOCK_R) if contiguous else None
    plan = _PLANS.get(ck) if contiguous else None
    if plan is None:
        xs, m, r, sx_b, sx_m, sx_n = _as_bmnr(x, d)
        b = x.shape[0]
        n_rows = b * m * k
        block_r = min(next_pow2(r), MAX_BLOCK_R)
        block_rows = max(1, min(ELEMS_PER_PROGRAM // block_r, next_pow2(n_rows)))
        grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(r, block_r), 1)
        num_warps = 4 if block_rows * block_r <= 2048 else 8
        plan = (m, r, sx_b, sx_m, sx_n, n_rows, block_rows, block_r, grid, num_warps,
                int_class(r), int_class(sx_b), int_class(sx_m), int_class(sx_n), int_class(n_rows)[2])
        if contiguous:
            _PLANS[ck] = plan
        else:
            x = xs
    return (x,) + plan


def gather_rows_triton(x: torch.Tensor, idx: torch.Tensor, dim: int = 1,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton gather: x [B, ..., N, ...] (token axis ``dim``), idx [B, k] -> contiguous x[..., idx, ...].

    Same values as ``gather_rows_reference`` (a bit copy) for indices in [0, N); others give zero rows.
    ``out`` (contiguous, the result's shape and dtype) may be passed to reuse a buffer."""
    if not HAS_TRITON:
        raise RuntimeError("gather_rows_triton: triton is not importable")
    d = check_gather_args(x, idx, dim)
    k = idx.shape[1]
    shape = gather_out_shape(tuple(x.shape), k, d)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gather_rows_triton: out must be a contiguous {x.dtype} tensor of shape {shape}")
    _launch_gather(x, idx, d, out)
    return out


def gather_rows_triton_unchecked(x: torch.Tensor, idx: torch.Tensor, d: int) -> torch.Tensor:
    """``gather_rows_triton`` for checked arguments and a non-negative token axis ``d`` (dispatcher's eager path)."""
    shape = list(x.shape)
    shape[d] = idx.shape[1]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _launch_gather(x, idx, d, out)
    return out


def _launch_gather(x: torch.Tensor, idx: torch.Tensor, d: int, out: torch.Tensor) -> None:
    if out.numel() == 0:
        return
    k = idx.shape[1]
    (xs, m, r, sx_b, sx_m, sx_n, n_rows, block_rows, block_r, grid, nw,
     c_r, c_sb, c_sm, c_sn, wide_rows) = _plan(x, d, k)
    view = _INT_VIEW.get(x.element_size())
    if view is None:
        raise TypeError(f"gather_rows_triton: element size {x.element_size()} of {x.dtype} not supported")
    xv, ov = xs.view(view), out.view(view)
    si_b, si_k = idx.stride()
    # everything Triton specialises on (n_rows, k, m, n are not specialised beyond their int width)
    key = (view, idx.dtype, block_rows, block_r, nw, ptr_class(xv), ptr_class(idx), ptr_class(ov),
           c_r, c_sb, c_sm, c_sn, int_class(si_b), int_class(si_k), wide_rows)
    _LAUNCH(key, grid, (xv, idx, ov, n_rows, k, m, xs.shape[d], r, sx_b, sx_m, sx_n, si_b, si_k, block_rows, block_r), nw)
