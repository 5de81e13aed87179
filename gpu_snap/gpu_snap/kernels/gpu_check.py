"""GPU correctness check of the Triton kernels: ``python -m vprune.kernels.gpu_check``.

On a CUDA device, compares select/gather (Triton) with the torch references over random, tie-heavy,
NaN/-inf, sorted and constant inputs, N up to 16384, fp32/bf16/fp16, with poisoned outputs; then the
public API under torch.compile(fullgraph=True) and inside a CUDA-graph capture. Prints one PASS/FAIL
line per group and exits 1 on any failure. Runs in well under a minute on an H100.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, List, Tuple

import torch

POISON = -7
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _scores(kind: str, b: int, n: int, dtype: torch.dtype, g: torch.Generator, dev: str) -> torch.Tensor:
    if kind == "random":
        s = torch.randn(b, n, generator=g, device=dev)
    elif kind == "ties":
        s = torch.randint(0, 5, (b, n), generator=g, device=dev).float()
    elif kind == "equal":
        s = torch.full((b, n), -1.25, device=dev)
    elif kind == "nan":
        s = torch.randn(b, n, generator=g, device=dev) * 100
        s[:, ::3] = float("nan")
        s[:, 1::8] = float("-inf")
        s[:, 2::10] = -0.0
        s[:, 4::10] = 0.0
        s[:, 5::29] = float("inf")
    elif kind == "sorted":
        s = torch.linspace(-1, 1, n, device=dev).repeat(b, 1)
    elif kind == "reversed":
        s = torch.linspace(1, -1, n, device=dev).repeat(b, 1)
    else:
        raise ValueError(kind)
    return s.to(dtype)


def check_select(dev: str, g: torch.Generator) -> Tuple[int, List[str]]:
    from .select import select_topk_per_row_reference, select_topk_per_row_triton, select_topk_reference, select_topk_triton

    fails: List[str] = []
    count = 0
    sizes = [(1, 1), (3, 7), (8, 100), (64, 576), (5, 577), (8, 1000), (8, 2304), (64, 4096), (2, 4097),
             (4, 8192), (2, 9000), (8, 16384), (1, 20000)]
    for dtype in DTYPES:
        for b, n in sizes:
            for kind in ("random", "ties", "nan", "equal", "sorted", "reversed"):
                for k in sorted({1, max(1, n // 9), max(1, n // 4), n}):
                    s = _scores(kind, b, n, dtype, g, dev)
                    out = torch.full((b, k), POISON, dtype=torch.int64, device=dev)
                    select_topk_triton(s, k, out=out)
                    ref = select_topk_reference(s, k)
                    count += 1
                    if not torch.equal(out, ref):
                        fails.append(f"select {dtype} {kind} B={b} N={n} k={k}")
        # per-row k
        for b, n in ((8, 576), (4, 9000)):
            s = _scores("ties", b, n, dtype, g, dev)
            k_max = n // 4
            kk = torch.randint(0, k_max + 1, (b,), generator=g, device=dev)
            kk[0] = 0
            kk[-1] = k_max
            for kdt in (torch.int64, torch.int32):  # both index dtypes, through the launch cache
                out = select_topk_per_row_triton(s, kk.to(kdt), k_max)
                count += 1
                if not torch.equal(out, select_topk_per_row_reference(s, kk, k_max)):
                    fails.append(f"per-row {dtype} B={b} N={n} k dtype {kdt}")
        # misaligned and aligned views of one buffer, alternating (the launch cache keys on alignment)
        buf = _scores("ties", 4, 2001, dtype, g, dev)
        for view in (buf[:, 1:], buf[:, :2000], buf[:, 3:], buf[1:, :2000]):
            count += 1
            if not torch.equal(select_topk_triton(view, 300), select_topk_reference(view, 300)):
                fails.append(f"select {dtype} view offset {view.storage_offset()}")
    return count, fails


def check_gather(dev: str, g: torch.Generator) -> Tuple[int, List[str]]:
    from .gather import gather_rows_reference, gather_rows_triton

    fails: List[str] = []
    count = 0
    cases = [((1, 576, 4096), 1, 144, torch.bfloat16), ((8, 2304, 4096), 1, 256, torch.bfloat16),
             ((4, 1000, 33), 1, 111, torch.float32), ((2, 100, 1), 1, 100, torch.float16),
             ((3, 8, 4096, 128), 2, 1024, torch.bfloat16), ((2, 32, 577, 64), -2, 144, torch.float16),
             ((2, 50, 5000), 1, 7, torch.float32), ((2, 10, 3, 7), 1, 4, torch.int64)]
    for shape, dim, k, dtype in cases:
        x = (torch.randn(shape, generator=g, device=dev) * 10).to(dtype)
        n = shape[dim]
        for sort in (True, False):
            idx = torch.randint(0, n, (shape[0], k), generator=g, device=dev)
            if sort:
                idx = torch.rand(shape[0], n, generator=g, device=dev).argsort(dim=1)[:, :k].sort(dim=1).values
            ref = gather_rows_reference(x, idx, dim)
            out = torch.empty(ref.shape, dtype=dtype, device=dev)
            out.view(torch.uint8).fill_(0x5A)
            gather_rows_triton(x, idx, dim, out=out)
            count += 1
            if not torch.equal(out, ref.contiguous()):
                fails.append(f"gather {dtype} {shape} dim={dim} k={k} sorted={sort}")
    # misaligned x (a view starting one element into its buffer), then aligned, through the launch cache
    flat = torch.randn(2 * 300 * 64 + 1, generator=g, device=dev).to(torch.bfloat16)
    idx = torch.randint(0, 300, (2, 40), generator=g, device=dev)
    for x in (flat[1:].view(2, 300, 64), flat[:-1].view(2, 300, 64), flat[1:].view(2, 300, 64)):
        count += 1
        if not torch.equal(gather_rows_triton(x, idx), gather_rows_reference(x, idx)):
            fails.append(f"gather storage offset {x.storage_offset()}")
    # a transposed (non-contiguous) K/V cache
    x = torch.randn(2, 300, 8, 64, generator=g, device=dev).to(torch.bfloat16).transpose(1, 2)
    idx = torch.randint(0, 300, (2, 50), generator=g, device=dev)
    count += 1
    if not torch.equal(gather_rows_triton(x, idx, 2), gather_rows_reference(x, idx, 2)):
        fails.append("gather transposed kv")
    return count, fails


def _pruned(s: torch.Tensor, h: torch.Tensor, k: int) -> torch.Tensor:
    from . import gather_rows, select_topk

    idx = select_topk(s, k)
    return gather_rows(h, idx, 1)


def check_compile(dev: str, g: torch.Generator) -> Tuple[int, List[str]]:
    from .dispatch import OPS_REGISTERED, backend_for

    fails: List[str] = []
    s = _scores("ties", 4, 576, torch.bfloat16, g, dev)
    h = torch.randn(4, 576, 256, generator=g, device=dev, dtype=torch.bfloat16)
    if backend_for(s) != "triton":
        fails.append(f"public API routes CUDA tensors to {backend_for(s)!r}, expected 'triton'")
    if not OPS_REGISTERED:
        return 1, fails + ["torch.library custom ops not registered"]
    want = _pruned(s, h, 144)
    count = 0
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        f = torch.compile(_pruned, fullgraph=True, backend=backend)
        count += 1
        try:
            if not torch.equal(f(s, h, 144), want):
                fails.append(f"torch.compile backend={backend}: values differ")
        except Exception as exc:  # noqa: BLE001 - report every failure as a FAIL line
            fails.append(f"torch.compile backend={backend}: {type(exc).__name__}: {exc}")
    return count, fails


def check_cuda_graph(dev: str, g: torch.Generator) -> Tuple[int, List[str]]:
    from .gather import gather_rows_reference
    from .select import select_topk_reference

    fails: List[str] = []
    s = _scores("random", 8, 2304, torch.bfloat16, g, dev)
    h = torch.randn(8, 2304, 512, generator=g, device=dev, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        _pruned(s, h, 256)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = _pruned(s, h, 256)
    except Exception as exc:  # noqa: BLE001
        return 1, [f"CUDA graph capture failed: {type(exc).__name__}: {exc}"]
    count = 0
    for kind in ("random", "ties", "nan"):  # new inputs into the captured buffers, then replay
        s.copy_(_scores(kind, 8, 2304, torch.bfloat16, g, dev))
        h.copy_(torch.randn(8, 2304, 512, generator=g, device=dev, dtype=torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        count += 1
        if not torch.equal(out, gather_rows_reference(h, select_topk_reference(s, 256))):
            fails.append(f"CUDA graph replay ({kind}): values differ")
    return count, fails


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL no CUDA device: gpu_check needs a GPU (the CPU tests cover the interpreter)")
        return 1
    from ._triton import HAS_TRITON, INTERPRET, triton

    if not HAS_TRITON or INTERPRET:
        print(f"FAIL triton importable={HAS_TRITON}, TRITON_INTERPRET={INTERPRET}: need compiled Triton")
        return 1
    dev = "cuda"
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    g = torch.Generator(device=dev).manual_seed(20261127)
    failed = False
    checks: List[Tuple[str, Callable]] = [("select", check_select), ("gather", check_gather),
                                          ("compile", check_compile), ("cuda-graph", check_cuda_graph)]
    for name, fn in checks:
        t0 = time.time()
        try:
            count, fails = fn(dev, g)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            count, fails = 0, [f"{type(exc).__name__}: {exc}"]
        failed |= bool(fails)
        print(f"{'FAIL' if fails else 'PASS'} {name}: {count - len(fails)}/{count} cases ({time.time() - t0:.1f} s)")
        for f in fails[:20]:
            print(f"    {f}")
    print("ALL PASS" if not failed else "SOME FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
