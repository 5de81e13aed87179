"""select_topk: the Triton kernel (run by Triton's CPU interpreter) against the torch reference.

Triton decides at import time whether kernels are interpreted, and other test modules may already
have imported vprune.kernels in this process, so the Triton cases run in one child process started
with TRITON_INTERPRET=1 (this file, run as a script with --worker). The child poisons every output
buffer, runs each case, and reports per case; the tests here check the report.
Reference semantics are tested directly in this process.
"""
from __future__ import annotations

import json
import sys
from typing import Dict, Iterator, Tuple

import pytest
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
POISON = -7


# ---- cases (shared by the worker and the tests' parametrisation) -----------------------------

def _scores(kind: str, b: int, n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        s = torch.randn(b, n, generator=g)
    elif kind == "ties":  # few distinct values: every threshold is a tie
        s = torch.randint(0, 4, (b, n), generator=g).float()
    elif kind == "equal":
        s = torch.full((b, n), 0.5)
    elif kind == "neginf":  # mostly -inf, a few finite and +inf
        s = torch.full((b, n), float("-inf"))
        s[:, ::5] = torch.randn(b, len(range(0, n, 5)), generator=g)
        s[:, 3::11] = float("inf")
    elif kind == "nan":  # NaN (both signs), -inf, +-0, subnormal and huge values mixed
        s = torch.randn(b, n, generator=g) * 1e3
        s[:, ::4] = float("nan")
        s[:, 1::9] = -float("nan")
        s[:, 2::7] = float("-inf")
        s[:, 3::6] = 0.0
        s[:, 5::6] = -0.0
        s[:, 7::13] = 1e-40 if dtype == torch.float32 else 1e-7
    elif kind == "allnan":
        s = torch.full((b, n), float("nan"))
    elif kind == "sorted":
        s = torch.arange(n, dtype=torch.float32).repeat(b, 1) / n
    elif kind == "reversed":
        s = torch.arange(n, 0, -1, dtype=torch.float32).repeat(b, 1) / n
    elif kind == "zeros_signed":  # -0.0 and +0.0 must tie (broken by index)
        s = torch.zeros(b, n)
        s[:, ::2] = -0.0
        s[:, 1::5] = -1.0
    else:
        raise ValueError(kind)
    return s.to(dtype)


def select_cases() -> Iterator[Tuple[str, str, int, int, int]]:
    """(name, kind, B, N, k): sizes small enough for the interpreter (~0.1 s a call)."""
    for kind in ("random", "ties", "equal", "neginf", "nan", "allnan", "sorted", "reversed", "zeros_signed"):
        for b, n, k in ((2, 577, 144), (1, 100, 1), (1, 100, 100), (1, 33, 9)):
            yield f"{kind}-B{b}-N{n}-k{k}", kind, b, n, k
    yield "random-B1-N1-k1", "random", 1, 1, 1
    yield "random-B1-N1000-k250", "random", 1, 1000, 250
    yield "ties-B1-N2304-k256", "ties", 1, 2304, 256


# cases run through the tiled (long-row) code path by shrinking its block constants in the worker
TILED_CASES = (("random", 1, 200, 77), ("ties", 2, 150, 75), ("nan", 1, 150, 120), ("equal", 1, 97, 50),
               ("reversed", 1, 100, 100))


# ---- the child process ----------------------------------------------------------------------

def _worker() -> Dict[str, str]:
    from vprune.kernels import select as S

    report: Dict[str, str] = {"_interpreted": type(S._select_topk_kernel).__name__}
    g = torch.Generator().manual_seed(1234)

    def check(name: str, scores: torch.Tensor, k: int) -> None:
        out = torch.full((scores.shape[0], k), POISON, dtype=torch.int64)
        try:
            S.select_topk_triton(scores, k, out=out)
            ref = S.select_topk_reference(scores, k)
            bad = (out != ref).any(dim=1).nonzero().flatten().tolist()
            report[name] = "ok" if not bad else f"row {bad[0]}: got {out[bad[0]].tolist()[:12]} want {ref[bad[0]].tolist()[:12]}"
        except Exception as exc:  # report, never crash the whole run
            report[name] = f"{type(exc).__name__}: {exc}"

    for dname, dt in DTYPES.items():
        for name, kind, b, n, k in select_cases():
            check(f"{dname}/{name}", _scores(kind, b, n, dt, g), k)
        # non-contiguous input: a column-strided view and a row-sliced view
        base = _scores("random", 3, 400, dt, g)
        check(f"{dname}/strided-cols", base[:, ::2], 50)
        check(f"{dname}/row-slice", base[1:, 10:310], 75)
        # long rows (~0.5-1 s each): N=16384 in registers (16-bit keys), N=20000 tiled (32-bit keys)
        if dt == torch.bfloat16:
            check(f"{dname}/long-N16384", _scores("ties", 1, 16384, dt, g), 4096)
        if dt == torch.float32:
            check(f"{dname}/long-tiled-N20000", _scores("ties", 1, 20000, dt, g), 5000)

    # the tiled code path at small N (many tiles, ties across tile borders), with 1 and 2 threshold
    # bits per round; and the register path with the round width its block does not default to
    saved = S.MAX_REGISTER_BLOCK, S.TILE_BLOCK, S.ROUND_BITS
    try:
        for rb in (1, 2):
            S.MAX_REGISTER_BLOCK, S.TILE_BLOCK, S.ROUND_BITS = 32, 32, rb
            for dname, dt in DTYPES.items():
                for kind, b, n, k in TILED_CASES:
                    check(f"{dname}/tiled-r{rb}-{kind}-B{b}-N{n}-k{k}", _scores(kind, b, n, dt, g), k)
        S.MAX_REGISTER_BLOCK, S.TILE_BLOCK = saved[:2]
        for rb in (1, 2):
            S.ROUND_BITS = rb
            for dname, dt in DTYPES.items():
                for kind in ("ties", "nan"):
                    check(f"{dname}/forced-r{rb}-{kind}", _scores(kind, 2, 300, dt, g), 100)
    finally:
        S.MAX_REGISTER_BLOCK, S.TILE_BLOCK, S.ROUND_BITS = saved

    # per-row k: k in {0, middle, k_max}, through the normal and the tiled path
    for dname, dt in DTYPES.items():
        for kind in ("random", "ties", "nan"):
            s = _scores(kind, 3, 300, dt, g)
            kk = torch.tensor([0, 37, 90])
            try:
                out = S.select_topk_per_row_triton(s, kk, 90, out=torch.full((3, 90), POISON, dtype=torch.int64))
                ref = S.select_topk_per_row_reference(s, kk, 90)
                report[f"{dname}/per-row-{kind}"] = "ok" if torch.equal(out, ref) else f"got {out.tolist()} want {ref.tolist()}"
            except Exception as exc:
                report[f"{dname}/per-row-{kind}"] = f"{type(exc).__name__}: {exc}"
    return report


@pytest.fixture(scope="module")
def report() -> Dict[str, str]:
    from _interpreter_worker import run_worker
    return run_worker(__file__)


def _check(report: Dict[str, str], prefix: str) -> None:
    from _interpreter_worker import check_cases
    check_cases(report, prefix)


def test_worker_ran_the_interpreter(report: Dict[str, str]) -> None:
    assert report["_interpreted"] == "InterpretedFunction"


@pytest.mark.parametrize("dname", list(DTYPES))
def test_triton_matches_reference(report: Dict[str, str], dname: str) -> None:
    _check(report, f"{dname}/")


@pytest.mark.parametrize("group", ["tiled-r1", "tiled-r2", "forced-r1", "forced-r2", "per-row-", "strided-cols",
                                   "row-slice"])
def test_triton_paths(report: Dict[str, str], group: str) -> None:
    for dname in DTYPES:
        _check(report, f"{dname}/{group}")


@pytest.mark.parametrize("case", ["bf16/long-N16384", "fp32/long-tiled-N20000"])
def test_triton_long_rows(report: Dict[str, str], case: str) -> None:
    _check(report, case)


# ---- reference semantics (this process, no Triton) ------------------------------------------

def test_reference_ties_nan_and_order() -> None:
    from vprune.kernels.select import select_topk_reference as ref

    s = torch.tensor([[1.0, float("nan"), 3.0, 3.0, float("-inf"), 3.0, -0.0, 0.0]])
    assert ref(s, 2).tolist() == [[2, 3]]  # ties to the lower index, ascending output
    assert ref(s, 4).tolist() == [[0, 2, 3, 5]]
    assert ref(s, 6).tolist() == [[0, 2, 3, 5, 6, 7]]  # -0.0 ties +0.0
    assert ref(s, 7).tolist() == [[0, 2, 3, 4, 5, 6, 7]]  # -inf before NaN
    assert ref(s, 8).tolist() == [list(range(8))]


def test_reference_per_row() -> None:
    from vprune.kernels.select import select_topk_per_row_reference as ref

    s = torch.tensor([[5.0, 1.0, 4.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    assert ref(s, torch.tensor([2, 0]), 3).tolist() == [[0, 2, -1], [-1, -1, -1]]


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True])
def test_bad_k_raises(bad) -> None:
    from vprune.kernels.select import select_topk_reference as ref

    with pytest.raises(ValueError, match="k="):
        ref(torch.zeros(2, 4), bad)


def test_bad_shape_and_dtype_raise() -> None:
    from vprune.kernels.select import select_topk_reference as ref

    with pytest.raises(ValueError, match="2-D"):
        ref(torch.zeros(4), 1)
    with pytest.raises(TypeError, match="dtype"):
        ref(torch.zeros(2, 4, dtype=torch.int32), 1)


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
