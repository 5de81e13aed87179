"""Top-k selection: the plain-torch reference and the Triton threshold-search kernel.

Semantics every implementation must match exactly:
- the k highest scores of each row; ties broken toward the lower index;
- NaN ranks below every number (below -inf), NaNs among themselves by index;
- -0.0 and +0.0 are equal (a tie, broken by index), as float comparison says;
- output indices in ascending token order (so gathered tokens keep their original order).

The Triton kernel (one program per row) never sorts:
1. keys: the raw bits of each score become an int32 key whose signed order is the float order
   (negative floats get their magnitude bits flipped, +-0 -> 0, NaN -> the smallest key);
2. threshold: the k-th largest key T is built high bits first: one bit a round (one count of
   keys >= candidate), or two bits a round for small blocks (the counts for lo + {1,2,3} * step from
   one block reduction); at most 16 rounds for fp16/bf16, 32 for fp32;
3. compaction: every key > T is kept, plus the first ``k - #(key > T)`` keys == T in index order;
   each kept lane writes its own index at its exclusive prefix count, so the output is ascending.
Rows up to ``MAX_REGISTER_BLOCK`` (16384) keys stay in registers for all rounds; longer rows are
re-read tile by tile in each round (from L1/L2). The search stops early once a candidate has exactly
k keys at or above it. Measurements behind the constants: kernels/NOTES.md, kernels/tune.py.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ._launch import FastLauncher, int_class, ptr_class
from ._triton import HAS_TRITON, next_pow2, tl, triton


def check_select_args(scores: torch.Tensor, k: int) -> None:
    """Shape/dtype/k checks shared by every implementation."""
    if scores.dim() != 2:
        raise ValueError(f"select_topk: scores must be 2-D [B, N], got shape {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"select_topk: scores dtype {scores.dtype} not supported: allowed float32, float16, bfloat16")
    n = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"select_topk: k={k!r} is invalid: allowed an int in [1, N={n}]")


def _rank_order(scores: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: each row's indices in selection order (NaN last, score descending, index ascending)."""
    s = scores.float()
    nan = torch.isnan(s)
    s = torch.where(nan, torch.full_like(s, float("-inf")), s)
    # Two stable sorts compose into one order: NaN last, then score descending, then index ascending.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    nan_in_order = torch.gather(nan, 1, order).to(torch.uint8)
    return torch.gather(order, 1, torch.sort(nan_in_order, dim=1, stable=True).indices)


def select_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-torch top-k with the semantics above: int64 [B, k], ascending indices."""
    check_select_args(scores, k)
    return torch.sort(_rank_order(scores)[:, :k], dim=1).values


def select_topk_per_row_reference(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per-row k: scores [B, N], k int [B] with 0 <= k[b] <= k_max -> int64 [B, k_max].

    Row b holds its k[b] indices ascending, then -1 in the unused slots (``gather_rows`` on the
    Triton path turns -1 into a zero row; the torch reference rejects it)."""
    check_select_args(scores, k_max)
    top = _rank_order(scores)[:, :k_max]
    keep = torch.arange(k_max, device=scores.device).unsqueeze(0) < k.to(scores.device, torch.int64).unsqueeze(1)
    big = torch.iinfo(torch.int64).max
    out = torch.sort(torch.where(keep, top, torch.full_like(top, big)), dim=1).values
    return torch.where(out == big, torch.full_like(out, -1), out)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

# Rows up to this many keys stay in registers for all rounds (16384 int32 keys over 16 warps = 32
# registers a thread). H100, bf16, N=16384: 17.6 us in registers vs 63-82 us re-reading tiles of
# 2048-8192 (kernels/tune.py). At most 16384: the compaction scan packs two 16-bit counts.
MAX_REGISTER_BLOCK = 16384
# Tile for longer rows, re-read from L1/L2 once per round: 8192 beat 4096 and 2048 (99 vs 111 vs 137 us
# fp32, N=16384 when tiled).
TILE_BLOCK = 8192

# (view dtype, key bits, magnitude mask, +inf bits) per score dtype. The kernel reads the raw bits
# through an integer view, so no float arithmetic runs on bf16/fp16 in the kernel.
_KEY_LAYOUT = {
    torch.float32: (torch.int32, 32, 0x7FFFFFFF, 0x7F800000),
    torch.float16: (torch.int16, 16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 16, 0x7FFF, 0x7F80),
}


# (warps, threshold bits per round) per power-of-two block, from two H100 sweeps in kernels/tune.py
# (device time in a CUDA graph, triton 3.6, B=1 and 64, bf16 and fp32 scores, k = N/4):
# - 256 keys: 1 warp, 1 bit (bf16 2.7 us; 2 bits 3.2; 2 warps 3.4);
# - 512 and 1024: 4 warps, 2 bits (N=576: bf16 4.0 vs 4.3 with 1 bit, fp32 5.8 vs 6.5; N=512: 3.6-3.9
#   us): small blocks are bound by the latency of the block-wide reduction, so halving rounds pays;
# - 2048 and 4096: 4 warps, 1 bit (second sweep, with the early exit: N=4096 bf16 6.9/7.1 us at
#   B=1/64 vs 7.3/7.4 with 8 warps; fp32 7.9/9.2 vs 8.2/9.6; 2 bits 7.3-8.5);
# - 8192: 8 warps, 1 bit (10.0-10.4 vs 11.3 with 2 bits); 16384: 16 warps, 1 bit (17.9 vs 19.8):
#   large blocks are bound by per-key work, which the packed int64 counts of 2-bit rounds double.
_TUNED = {256: (1, 1), 512: (4, 2), 1024: (4, 2), 2048: (4, 1), 4096: (4, 1), 8192: (8, 1), 16384: (16, 1)}
ROUND_BITS: Optional[int] = None  # None: per _TUNED; 1 or 2 forces it (tests, tune)


def _num_warps(block: int) -> int:
    """Warps per row program for a power-of-two block (see _TUNED)."""
    return _TUNED[max(256, min(block, 16384))][0]


def _round_bits(block: int) -> int:
    """Threshold bits settled per round for a power-of-two block (see _TUNED)."""
    if ROUND_BITS is not None:
        return ROUND_BITS
    return _TUNED[max(256, min(block, 16384))][1]


if HAS_TRITON:
    _F2 = tl.constexpr(1 + (1 << 21))  # counts fields for "key >= c2" (also >= c1)
    _F3 = tl.constexpr(1 + (1 << 21) + (1 << 42))  # "key >= c3" (also >= c2, >= c1)

    @triton.jit
    def _row_keys(base_ptr, offs, n, inf_bits, ABS_MASK: tl.constexpr, KEY_MIN: tl.constexpr):
        """int32 order-preserving keys of the lanes ``offs`` of one row; lanes >= n get KEY_MIN."""
        # other=ABS_MASK is a NaN bit pattern, so padding lanes fall into the NaN branch below.
        bits = tl.load(base_ptr + offs, mask=offs < n, other=ABS_MASK).to(tl.int32)  # sign-extends int16
        mag = bits & ABS_MASK
        key = tl.where(bits < 0, bits ^ ABS_MASK, bits)  # negative floats: larger magnitude -> smaller key
        key = tl.where(mag == 0, 0, key)  # -0.0 ties with +0.0
        key = tl.where(mag > inf_bits, KEY_MIN, key)  # NaN (and padding) below -inf
        return key

    # n and k are not specialised (k == 1 or n % 16 would otherwise compile extra variants for no
    # gain); inf_bits is a runtime value so fp16 and bf16 share one compiled kernel.
    @triton.jit(do_not_specialize=["n", "k"])
    def _select_topk_kernel(
        bits_ptr, out_ptr, k_ptr, n, k, inf_bits, stride_row, stride_out,
        KEY_BITS: tl.constexpr, ABS_MASK: tl.constexpr, KEY_MIN: tl.constexpr,
        BLOCK: tl.constexpr, NUM_TILES: tl.constexpr, PER_ROW_K: tl.constexpr, ROUND_BITS: tl.constexpr,
    ):
        """One program per row: keys -> k-th largest key by bisection -> in-order compaction."""
        row = tl.program_id(0).to(tl.int64)
        base = bits_ptr + row * stride_row
        out_row = out_ptr + row * stride_out
        if PER_ROW_K:
            k_row = tl.load(k_ptr + row).to(tl.int32)
        else:
            k_row = k
        offs = tl.arange(0, BLOCK)
        if NUM_TILES == 1:
            keys = _row_keys(base, offs, n, inf_bits, ABS_MASK, KEY_MIN)

        # Threshold: largest T with #(key >= T) >= k, built from KEY_MIN upward, high bits first;
        # int64 scalars because KEY_MIN + 2**31 overflows int32 before the candidate is final.
        # Early exit: when a kept candidate c has exactly k keys >= c, those keys are the answer;
        # the search stops and thr = c - 1 (so "key > thr" keeps exactly them and no tie is needed).
        lo = tl.full([], KEY_MIN, tl.int64)
        exact = tl.full([], 0, tl.int64)
        step = tl.full([], 1 << (KEY_BITS - ROUND_BITS), tl.int64)
        while step > 0:
            if ROUND_BITS == 1:
                # one bit a round: one count (#key >= lo + step)
                c1 = (lo + step).to(tl.int32)
                if NUM_TILES == 1:
                    cnt = tl.sum((keys >= c1).to(tl.int32), axis=0)
                else:
                    cnt = tl.full([], 0, tl.int32)
                    for t in range(NUM_TILES):
                        kt = _row_keys(base, t * BLOCK + offs, n, inf_bits, ABS_MASK, KEY_MIN)
                        cnt += tl.sum((kt >= c1).to(tl.int32), axis=0)
                take = cnt >= k_row
                hit = cnt == k_row
                lo = tl.where(take, lo + step, lo)
                step = tl.where(hit, 0, step >> 1)
            else:
                # two bits a round: the counts for lo + {1,2,3} * step come from ONE reduction, packed
                # in 21-bit fields of an int64 (counts < 2**21: the launcher checks N). Half the
                # rounds; pays where the block-wide reduction's latency dominates (small blocks).
                c1 = (lo + step).to(tl.int32)
                c2 = (lo + 2 * step).to(tl.int32)
                c3 = (lo + 3 * step).to(tl.int32)
                if NUM_TILES == 1:
                    # key >= c3 implies key >= c2 implies key >= c1: one field value per case
                    v = tl.where(keys >= c3, _F3, tl.where(keys >= c2, _F2, tl.where(keys >= c1, 1, 0).to(tl.int64)))
                    tot = tl.sum(v, axis=0)
                else:
                    tot = tl.full([], 0, tl.int64)
                    for t in range(NUM_TILES):
                        kt = _row_keys(base, t * BLOCK + offs, n, inf_bits, ABS_MASK, KEY_MIN)
                        v = tl.where(kt >= c3, _F3, tl.where(kt >= c2, _F2, tl.where(kt >= c1, 1, 0).to(tl.int64)))
                        tot += tl.sum(v, axis=0)
                n1 = tot & 0x1FFFFF
                n2 = (tot >> 21) & 0x1FFFFF
                n3 = tot >> 42
                m = (n1 >= k_row).to(tl.int64) + (n2 >= k_row).to(tl.int64) + (n3 >= k_row).to(tl.int64)
                n_m = tl.where(m == 3, n3, tl.where(m == 2, n2, n1))
                hit = (m > 0) & (n_m == k_row)
                lo = lo + m * step
                step = tl.where(hit, 0, step >> 2)
            exact = hit.to(tl.int64)
        thr = (lo - exact).to(tl.int32)

        # Compaction. One scan serves both counts: gt in the low 16 bits, eq in the high 16
        # (a block has at most 16384 lanes, so neither half overflows).
        if NUM_TILES == 1:
            gt = (keys > thr).to(tl.int32)
            eq = (keys == thr).to(tl.int32)
            packed = gt + (eq << 16)
            incl = tl.cumsum(packed, axis=0)
            n_gt = tl.sum(gt, axis=0)
            need = k_row - n_gt  # how many ties at the threshold are kept: the first ones
            gt_before = (incl & 0xFFFF) - gt
            eq_before = (incl >> 16) - eq
            sel = (gt > 0) | ((eq > 0) & (eq_before < need))
            pos = gt_before + tl.minimum(eq_before, need)
            tl.store(out_row + pos, offs.to(tl.int64), mask=sel)
        else:
            n_gt = tl.full([], 0, tl.int32)
            for t in range(NUM_TILES):
                kt = _row_keys(base, t * BLOCK + offs, n, inf_bits, ABS_MASK, KEY_MIN)
                n_gt += tl.sum((kt > thr).to(tl.int32), axis=0)
            need = k_row - n_gt
            gt_seen = tl.full([], 0, tl.int32)
            eq_seen = tl.full([], 0, tl.int32)
            for t in range(NUM_TILES):
                idx = t * BLOCK + offs
                kt = _row_keys(base, idx, n, inf_bits, ABS_MASK, KEY_MIN)
                gt = (kt > thr).to(tl.int32)
                eq = (kt == thr).to(tl.int32)
                incl = tl.cumsum(gt + (eq << 16), axis=0)
                gt_before = gt_seen + (incl & 0xFFFF) - gt
                eq_before = eq_seen + (incl >> 16) - eq
                sel = (gt > 0) | ((eq > 0) & (eq_before < need))
                pos = gt_before + tl.minimum(eq_before, need)
                tl.store(out_row + pos, idx.to(tl.int64), mask=sel)
                gt_seen += tl.sum(gt, axis=0)
                eq_seen += tl.sum(eq, axis=0)


def _config(dtype: torch.dtype, n: int) -> Tuple[Any, ...]:
    """Launch constants for a row length and dtype (cached: they are pure functions of both)."""
    ck = (dtype, n, MAX_REGISTER_BLOCK, TILE_BLOCK, ROUND_BITS, _num_warps)  # module constants: tests/tune override them
    cfg = _CONFIGS.get(ck)
    if cfg is None:
        view_dtype, key_bits, abs_mask, inf_bits = _KEY_LAYOUT[dtype]
        block, num_tiles = next_pow2(n), 1
        if block > MAX_REGISTER_BLOCK:
            block = TILE_BLOCK
            num_tiles = triton.cdiv(n, block)
        round_bits = _round_bits(block) if n < (1 << 21) else 1  # 2-bit rounds pack counts in 21-bit fields
        cfg = (view_dtype, key_bits, abs_mask, inf_bits, -(1 << (key_bits - 1)), block, num_tiles, round_bits,
               _num_warps(block))
        _CONFIGS[ck] = cfg
    return cfg


_CONFIGS: Dict[Tuple[Any, ...], Tuple[Any, ...]] = {}
_LAUNCH = FastLauncher(_select_topk_kernel) if HAS_TRITON else None


def _launch_select(scores: torch.Tensor, out: torch.Tensor, k: int, k_per_row: Optional[torch.Tensor]) -> None:
    """Launch one program per row; arguments are already checked. No host synchronisation."""
    b, n = scores.shape
    if b == 0:
        return
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    view_dtype, key_bits, abs_mask, inf_bits, key_min, block, num_tiles, round_bits, nw = _config(scores.dtype, n)
    bits = scores.view(view_dtype)
    per_row = k_per_row is not None
    kp = k_per_row if per_row else out
    sr, so = bits.stride(0), out.stride(0)
    # everything Triton specialises this kernel on (n, k are not specialised; inf_bits is always a
    # 32-bit multiple of 16), so a cached compiled kernel is reused only where it is valid
    key = (key_bits, block, num_tiles, per_row, round_bits, nw, ptr_class(bits), ptr_class(out), ptr_class(kp),
           kp.dtype, int_class(sr), int_class(so))
    _LAUNCH(key, (b, 1, 1),
            (bits, out, kp, n, k, inf_bits, sr, so, key_bits, abs_mask, key_min, block, num_tiles, per_row, round_bits),
            nw)


def select_topk_triton(scores: torch.Tensor, k: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton top-k: scores [B, N] fp32/fp16/bf16 -> int64 [B, k], same result as the reference.

    ``out`` (int64 [B, k], row stride free, last stride 1) may be passed to reuse a buffer; every
    element is written. No host synchronisation: safe inside CUDA-graph capture."""
    if not HAS_TRITON:
        raise RuntimeError("select_topk_triton: triton is not importable")
    check_select_args(scores, k)
    if out is None:
        out = torch.empty((scores.shape[0], k), dtype=torch.int64, device=scores.device)
    elif out.shape != (scores.shape[0], k) or out.dtype != torch.int64 or out.stride(1) != 1:
        raise ValueError(f"select_topk_triton: out must be int64 [{scores.shape[0]}, {k}] with last stride 1")
    _launch_select(scores, out, k, None)
    return out


def select_topk_triton_unchecked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``select_topk_triton`` for arguments the caller has already checked (the dispatcher's eager path)."""
    out = torch.empty((scores.shape[0], k), dtype=torch.int64, device=scores.device)
    _launch_select(scores, out, k, None)
    return out


def select_topk_per_row_triton(scores: torch.Tensor, k: torch.Tensor, k_max: int,
                               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row k on the Triton path: scores [B, N], k int [B] (each in [0, k_max]) -> int64 [B, k_max],
    row b's k[b] indices ascending then -1. k is read on the device: no host sync."""
    if not HAS_TRITON:
        raise RuntimeError("select_topk_per_row_triton: triton is not importable")
    check_select_args(scores, k_max)
    if k.shape != (scores.shape[0],) or k.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"select_topk_per_row: k must be an int32/int64 tensor [{scores.shape[0]}], got "
                         f"{k.dtype} {tuple(k.shape)}")
    if out is None:
        out = torch.full((scores.shape[0], k_max), -1, dtype=torch.int64, device=scores.device)
    else:
        out.fill_(-1)
    _launch_select(scores, out, k_max, k.to(device=scores.device, dtype=torch.int64).contiguous())
    return out
