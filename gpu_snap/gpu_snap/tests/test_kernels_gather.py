"""gather_rows: the Triton row-copy kernel (run by Triton's CPU interpreter) against the torch reference.

As in test_kernels_select.py, the Triton cases run in one child process started with
TRITON_INTERPRET=1 (this file with --worker); every output buffer is poisoned first and results are
compared bit for bit (through an integer view, so NaN payloads and -0.0 count).
"""
from __future__ import annotations

import json
import sys
from typing import Dict

import pytest
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int64": torch.int64,
          "int8": torch.int8, "bool": torch.bool}
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _values(shape, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, shape, generator=g).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    x.view(-1)[::17] = float("nan")
    x.view(-1)[1::19] = -0.0
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


def _poison(shape, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    out.view(_BITS[out.element_size()]).fill_(0x55)  # a pattern no case produces in every element
    return out


# (name, x shape, token dim, k, index kind)
CASES = (
    ("hidden", (2, 50, 24), 1, 13, "sorted"),
    ("hidden-k1", (2, 50, 24), 1, 1, "sorted"),
    ("hidden-kN", (2, 50, 24), 1, 50, "sorted"),
    ("hidden-D1", (3, 40, 1), 1, 7, "sorted"),
    ("hidden-D4096", (1, 9, 4096), 1, 4, "sorted"),
    ("hidden-D5000-split", (1, 6, 5000), 1, 3, "sorted"),  # rows wider than MAX_BLOCK_R
    ("hidden-odd", (2, 37, 33), 1, 11, "random"),  # unsorted and repeated indices
    ("kv-dim2", (2, 3, 40, 16), 2, 9, "sorted"),
    ("kv-dim-2", (2, 3, 40, 16), -2, 9, "random"),
    ("5d-mid2", (2, 2, 3, 20, 8), 3, 5, "sorted"),
    ("rest2", (2, 20, 3, 5), 1, 6, "sorted"),
    ("token-last", (2, 4, 30), 2, 7, "sorted"),
)


def _worker() -> Dict[str, str]:
    from vprune.kernels import gather as G

    report: Dict[str, str] = {"_interpreted": type(G._gather_rows_kernel).__name__}
    g = torch.Generator().manual_seed(99)

    def check(name: str, x: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
        try:
            ref = G.gather_rows_reference(x, idx, dim)
            out = _poison(ref.shape, ref.dtype)
            G.gather_rows_triton(x, idx, dim, out=out)
            report[name] = "ok" if torch.equal(_bits(out), _bits(ref)) else "values differ"
        except Exception as exc:
            report[name] = f"{type(exc).__name__}: {exc}"

    for dname, dt in DTYPES.items():
        for name, shape, dim, k, kind in CASES:
            if dname in ("int8", "bool", "int64") and name not in ("hidden", "kv-dim2"):
                continue  # integer views are shared with the float types; keep the run short
            x = _values(shape, dt, g)
            n = shape[dim]
            if kind == "sorted":
                idx = torch.sort(torch.rand(shape[0], n, generator=g).argsort(dim=1)[:, :k], dim=1).values
            else:
                idx = torch.randint(0, n, (shape[0], k), generator=g)
            check(f"{dname}/{name}", x, idx, dim)
    # int32 indices, strided idx, and non-contiguous x (a [B, N, H, Dh] cache transposed to [B, H, N, Dh];
    # a column-strided hidden state)
    x = _values((2, 30, 4, 8), torch.bfloat16, g)
    idx = torch.randint(0, 30, (2, 6), generator=g)
    check("layout/int32-idx", x, idx.to(torch.int32), 1)
    check("layout/strided-idx", x, torch.randint(0, 30, (2, 12), generator=g)[:, ::2], 1)
    check("layout/transposed-kv", x.transpose(1, 2), idx, 2)
    check("layout/strided-rest", _values((2, 30, 16), torch.float32, g)[:, :, ::2], idx, 1)
    # indices outside [0, N) copy zero rows on the Triton path (documented; the reference raises)
    x = _values((1, 10, 8), torch.float32, g)
    out = _poison((1, 3, 8), torch.float32)
    G.gather_rows_triton(x, torch.tensor([[-1, 4, 10]]), 1, out=out)
    ok = torch.equal(out[0, 0], torch.zeros(8)) and torch.equal(_bits(out[0, 1]), _bits(x[0, 4])) \
        and torch.equal(out[0, 2], torch.zeros(8))
    report["layout/out-of-range-zero"] = "ok" if ok else f"got {out}"
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


@pytest.mark.parametrize("group", list(DTYPES) + ["layout"])
def test_triton_matches_reference(report: Dict[str, str], group: str) -> None:
    _check(report, f"{group}/")


# ---- reference and argument checks (this process, no Triton) ----------------------------------

def test_reference_kv_layout() -> None:
    from vprune.kernels.gather import gather_rows_reference as ref

    x = torch.arange(2 * 3 * 5 * 2).reshape(2, 3, 5, 2)
    idx = torch.tensor([[0, 4], [1, 2]])
    out = ref(x, idx, 2)
    assert out.shape == (2, 3, 2, 2)
    assert torch.equal(out[1, 2], x[1, 2, [1, 2]])


def test_bad_args_raise() -> None:
    from vprune.kernels.gather import gather_rows_reference as ref

    x = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="idx"):
        ref(x, torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="batch"):
        ref(x, torch.zeros(3, 2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="dim"):
        ref(x, torch.zeros(2, 2, dtype=torch.int64), 0)


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
