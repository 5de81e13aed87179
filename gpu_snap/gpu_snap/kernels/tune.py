"""Measurements behind the kernel constants: ``python -m vprune.kernels.tune [--quick]`` (CUDA only).

1. host cost per call (perf_counter over many queued calls, no sync): what eager launches cost;
2. select: warps per program and the register/tile split, device time per call in a CUDA graph;
3. gather: elements per program and warps, device time per call in a CUDA graph vs the copy floor.
The chosen constants in select.py / gather.py cite these numbers (see kernels/NOTES.md).
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

import torch


def host_us(fn: Callable[[], Any], calls: int = 2000) -> float:
    """Median host microseconds per call over 5 bursts of queued calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        per.append((time.perf_counter() - t) * 1e6 / (calls // 5))
        torch.cuda.synchronize()
    return statistics.median(per)


def loop_us(fn: Callable[[], Any], calls: int = 200, repeats: int = 15) -> float:
    """Median microseconds per call of back-to-back eager calls between two events."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(repeats):
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(out)


def graph_us(fn: Callable[[], Any], calls: int = 20, repeats: int = 20) -> float:
    """Median device microseconds per call, ``calls`` calls captured in one CUDA graph."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(repeats):
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(out)


def main() -> int:
    if not torch.cuda.is_available():
        print("tune needs a CUDA device")
        return 1
    import triton
    import triton.language as tl

    from . import gather as G
    from . import select as S
    from .dispatch import gather_rows, select_topk

    quick = "--quick" in sys.argv
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")

    @triton.jit
    def _empty(x_ptr):
        pass

    dev = "cuda"
    s576 = torch.randn(1, 576, device=dev, dtype=torch.bfloat16)
    x576 = torch.randn(1, 576, 4096, device=dev, dtype=torch.bfloat16)
    idx = select_topk(s576, 144)
    tiny = torch.zeros(1, device=dev)
    from . import _launch as L
    from ._launch import fast_path_enabled, int_class, ptr_class

    S.select_topk_triton(s576, 144)  # compile, and fill the launch cache
    sel_key = next(iter(S._LAUNCH.cache))[1]  # cache keys are (current device, key)
    sel_args = (s576.view(torch.int16), idx, idx, 576, 144, 0x7F80, 576, 144, 16, 0x7FFF, -32768, 1024, 1, False, 2)

    print(f"\n[host us per call, queued, no sync; fast launch path {fast_path_enabled()}]")
    for name, fn in [
        ("torch add_ (1 elem)", lambda: tiny.add_(1)),
        ("torch.empty [1,144] int64", lambda: torch.empty((1, 144), dtype=torch.int64, device=dev)),
        ("triton empty kernel", lambda: _empty[(1,)](tiny)),
        ("select_topk public", lambda: select_topk(s576, 144)),
        ("select_topk_triton", lambda: S.select_topk_triton(s576, 144)),
        ("select_topk_triton via JIT run", lambda: S._select_topk_kernel[(1,)](
            s576.view(torch.int16), idx, idx, 576, 144, 0x7F80, 576, 144, 16, 0x7FFF, -32768, 1024, 1, False,
            2, num_warps=4)),
        ("  launch only (cached key)", lambda: S._LAUNCH(sel_key, (1, 1, 1), sel_args, 4)),
        ("  scores.view(int16)", lambda: s576.view(torch.int16)),
        ("  key/ptr classes", lambda: (ptr_class(s576), ptr_class(idx), ptr_class(idx), int_class(576), int_class(144),
                                       s576.get_device())),
        ("gather_rows public", lambda: gather_rows(x576, idx)),
        ("torch topk+sort", lambda: s576.topk(144, dim=1).indices.sort(dim=1).values),
        ("torch gather expanded", lambda: torch.gather(x576, 1, idx.unsqueeze(-1).expand(-1, -1, 4096))),
    ]:
        print(f"  {name:<32} host {host_us(fn):7.2f}  loop {loop_us(fn):7.2f}")
    print(f"  fast path enabled {L.fast_path_enabled()} ({L.DISABLED_REASON or 'ok'}); cached select launches "
          f"{S._LAUNCH.fast_calls}, gather {G._LAUNCH.fast_calls}")

    print("\n[select: device us per call in a CUDA graph, by bits per round and warps per program]")
    saved_warps, saved_rb = S._num_warps, S.ROUND_BITS
    ns = (512, 2048, 4096) if quick else (256, 512, 576, 2048, 2304, 4096, 8192, 16384)
    for dt in (torch.bfloat16, torch.float32):
        for b in (1, 64):
            for n in ns:
                s = torch.randn(b, n, device=dev, dtype=dt)
                k = n // 4
                cells = []
                for rb in (1, 2):
                    S.ROUND_BITS = rb
                    for w in (1, 2, 4, 8, 16):
                        if (n > 4096 and w < 4) or (n <= 1024 and w > 8):
                            continue
                        S._num_warps = lambda block, w=w: w
                        try:
                            cells.append(f"r{rb}w{w}:{graph_us(lambda: S.select_topk_triton(s, k)):6.1f}")
                        except Exception as exc:  # noqa: BLE001 - e.g. out of registers
                            cells.append(f"r{rb}w{w}: {type(exc).__name__}")
                    S._num_warps = saved_warps
                S.ROUND_BITS = saved_rb
                cells.append(f"chosen:{graph_us(lambda: S.select_topk_triton(s, k)):6.1f}")
                print(f"  {str(dt)[6:]:>8} B={b:<3} N={n:<6} k={k:<5} " + " ".join(cells), flush=True)
    S._num_warps, S.ROUND_BITS = saved_warps, saved_rb

    print("\n[select long rows: register block / tile, device us in a graph]")
    saved = S.MAX_REGISTER_BLOCK, S.TILE_BLOCK
    for dt in (torch.bfloat16, torch.float32):
        for b in (1, 64):
            s = torch.randn(b, 16384, device=dev, dtype=dt)
            cells = []
            for reg, tile in ((8192, 4096), (8192, 8192), (16384, 8192)):
                S.MAX_REGISTER_BLOCK, S.TILE_BLOCK = reg, tile
                try:
                    cells.append(f"reg{reg}/tile{tile}:{graph_us(lambda: S.select_topk_triton(s, 4096)):6.1f}")
                except Exception as exc:  # noqa: BLE001
                    cells.append(f"reg{reg}/tile{tile}: {type(exc).__name__}")
            S.MAX_REGISTER_BLOCK, S.TILE_BLOCK = saved
            print(f"  {str(dt)[6:]:>8} B={b:<3} N=16384 k=4096 " + "  ".join(cells))
    S.MAX_REGISTER_BLOCK, S.TILE_BLOCK = saved

    print("\n[gather: device us in a graph / copy floor, by elements per program]")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (graph_us(lambda: dst.copy_(src), calls=5) * 1e-6)
    del src, dst
    print(f"  copy bandwidth {bw / 1e12:.2f} TB/s")
    saved_e = G.ELEMS_PER_PROGRAM
    for b, n, k, d in ((1, 576, 144, 4096), (64, 576, 144, 4096), (64, 4096, 1024, 4096), (8, 4096, 1024, 128)):
        x = torch.randn(b, n, d, device=dev, dtype=torch.bfloat16)
        ix = torch.rand(b, n, device=dev).argsort(1)[:, :k].sort(1).values
        floor = 2 * b * k * d * 2 / bw * 1e6
        calls = max(1, min(20, (2 << 30) // (b * k * d * 2)))
        cells = []
        for e in (2048, 4096, 8192, 16384):
            G.ELEMS_PER_PROGRAM = e
            t = graph_us(lambda: G.gather_rows_triton(x, ix), calls=calls)
            cells.append(f"e{e}:{t:7.1f} ({t / floor:4.2f}x)")
        G.ELEMS_PER_PROGRAM = saved_e
        t = graph_us(lambda: x.view(b * n, d).index_select(0, (ix + torch.arange(b, device=dev)[:, None] * n).view(-1)),
                     calls=calls)
        print(f"  B={b:<3} N={n:<5} k={k:<5} D={d:<5} floor {floor:7.1f}  " + "  ".join(cells) + f"  index_select {t:7.1f}")
        del x
    G.ELEMS_PER_PROGRAM = saved_e
    return 0


if __name__ == "__main__":
    sys.exit(main())
