"""Triton top-k select + row gather vs the torch baseline (topk + index sort + expanded gather).

    vprune bench kernels [--quick] [--out bench_kernels.json] [--score-dtype bf16|fp32|fp16]

Shapes: B in {1, 8, 64} x N in {256, 576, 2304, 4096, 16384} x k in {N/4, N/9}; hidden states
[B, N, 4096] bf16, scores [B, N] (bf16 by default; fp32 select times are reported beside them).
Each op is timed three ways, the median of many runs:
* eager (device): one eager call between two CUDA events, launched while the device is still busy
  with a 512 MB memset (triton.testing.do_bench's method), so the events see device time only, L2 cold;
* eager (loop): back-to-back eager calls between two events, time / calls: the larger of the host
  launch cost and the device time, which is what an eager model pays per call on this host;
* graph: several calls captured in one CUDA graph, replay time / calls (device time, no launch gaps).
The copy-bandwidth floor for gather, bytes read + written / copy bandwidth, uses a device-to-device
copy bandwidth measured here. The targets of issue 3 are checked at the end.
Needs a CUDA device; exits with a message otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional

import torch

HIDDEN = 4096
FULL_B = (1, 8, 64)
FULL_N = (256, 576, 2304, 4096, 16384)
QUICK_B = (1, 64)
QUICK_N = (576, 4096)
GRAPH_OUT_BYTES = 2 << 30  # cap on outputs a captured graph keeps alive (calls per graph shrink to fit)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="B in {1, 64}, N in {576, 4096}, fewer repeats")
    p.add_argument("--out", default="bench_kernels.json", help="JSON output path (default bench_kernels.json)")
    p.add_argument("--score-dtype", choices=sorted(_DTYPES), default="bf16", help="dtype of the scores (default bf16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 200, quick 50)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")


# ---- timing -----------------------------------------------------------------------------------

_FLUSH: Optional[torch.Tensor] = None


def _flush() -> None:
    """Keep the device busy (~170 us: a 512 MB memset, which also evicts L2) while the host launches
    the timed call, so the events around it see device time only (triton.testing.do_bench's method)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    _FLUSH.zero_()


def time_eager_device(fn: Callable[[], Any], repeats: int, warmup: int = 5) -> float:
    """Median device microseconds of one eager call (launched behind a flush; cold L2)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        _flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def time_eager_loop(fn: Callable[[], Any], repeats: int, calls: int = 20) -> float:
    """Median microseconds per call of ``calls`` back-to-back eager calls between two events: the
    larger of host launch cost and device time, which is what an eager model pays per call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def time_graph(fn: Callable[[], Any], repeats: int, calls: int) -> float:
    """Median microseconds per call of ``calls`` calls captured in one CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bf16 tensors), counting bytes read plus written."""
    src = torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)
    t_us = time_eager_device(lambda: dst.copy_(src), repeats)
    del src, dst
    return 2 * nbytes / (t_us * 1e-6)


def launch_floor() -> Dict[str, float]:
    """Microseconds of an empty Triton kernel launch, eager device time / eager loop / in a graph:
    the floor under any single-kernel op, select included."""
    import triton

    @triton.jit
    def _empty(x_ptr):
        pass

    x = torch.zeros(1, device="cuda")
    fn = lambda: _empty[(1,)](x)  # noqa: E731
    return {"eager": time_eager_device(fn, 200), "loop": time_eager_loop(fn, 20), "graph": time_graph(fn, 50, 20)}


# ---- ops ----------------------------------------------------------------------------------

def torch_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """What pruning code writes without the kernel: top-k, then indices back in token order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def torch_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def bench_shape(b: int, n: int, k: int, score_dtype: torch.dtype, repeats: int, graph: bool,
                bw: float) -> Dict[str, Any]:
    from vprune.kernels import gather_rows, select_topk

    g = torch.Generator(device="cuda").manual_seed(b * 100003 + n * 7 + k)
    scores = torch.randn(b, n, device="cuda", generator=g).to(score_dtype)
    scores32 = torch.randn(b, n, device="cuda", generator=g)  # full fp32 precision (fp32 softmax scores)
    x = torch.randn(b, n, HIDDEN, device="cuda", generator=g, dtype=torch.bfloat16)
    idx = select_topk(scores, k)
    ops: Dict[str, Callable[[], Any]] = {
        "select_torch": lambda: torch_select(scores, k),
        "select_triton": lambda: select_topk(scores, k),
        "select_triton_fp32": lambda: select_topk(scores32, k),
        "gather_torch": lambda: torch_gather(x, idx),
        "gather_index_select": lambda: x.view(b * n, HIDDEN).index_select(
            0, (idx + torch.arange(b, device="cuda").unsqueeze(1) * n).view(-1)).view(b, k, HIDDEN),
        "gather_triton": lambda: gather_rows(x, idx),
        "total_torch": lambda: torch_gather(x, torch_select(scores, k)),
        "total_triton": lambda: gather_rows(x, select_topk(scores, k)),
    }
    out_bytes = b * k * HIDDEN * 2
    calls = max(1, min(20, GRAPH_OUT_BYTES // max(1, out_bytes)))
    row: Dict[str, Any] = {"B": b, "N": n, "k": k, "D": HIDDEN, "score_dtype": str(score_dtype).replace("torch.", ""),
                           "gather_bytes": 2 * out_bytes, "gather_floor_us": 2 * out_bytes / bw * 1e6,
                           "eager_us": {}, "loop_us": {}, "graph_us": {}, "graph_calls": calls}
    for name, fn in ops.items():
        row["eager_us"][name] = time_eager_device(fn, repeats)
        row["loop_us"][name] = time_eager_loop(fn, max(10, repeats // 10))
    if graph:
        for name, fn in ops.items():
            row["graph_us"][name] = time_graph(fn, max(10, repeats // 4), calls)
    del x, scores, scores32, idx
    torch.cuda.empty_cache()
    return row


# ---- report -------------------------------------------------------------------------------

def _table(rows: List[Dict[str, Any]], mode: str) -> str:
    head = (f"{'B':>3} {'N':>6} {'k':>5} | {'sel torch':>9} {'sel tri':>8} {'sel f32':>8} | {'gat torch':>9} "
            f"{'idx_sel':>8} {'gat tri':>8} {'floor':>8} {'x floor':>7} | {'tot torch':>9} {'tot tri':>8} {'speedup':>7}")
    title = {"eager": "eager, device time", "loop": "eager loop, host launch included", "graph": "CUDA graph"}[mode]
    lines = [f"[{title}] microseconds per call (median)", head, "-" * len(head)]
    for r in rows:
        t = r[f"{mode}_us"]
        if not t:
            continue
        lines.append(
            f"{r['B']:>3} {r['N']:>6} {r['k']:>5} | {t['select_torch']:>9.1f} {t['select_triton']:>8.1f} "
            f"{t['select_triton_fp32']:>8.1f} | {t['gather_torch']:>9.1f} {t['gather_index_select']:>8.1f} "
            f"{t['gather_triton']:>8.1f} {r['gather_floor_us']:>8.1f} {t['gather_triton'] / r['gather_floor_us']:>7.2f} | "
            f"{t['total_torch']:>9.1f} {t['total_triton']:>8.1f} {t['total_torch'] / t['total_triton']:>6.1f}x")
    return "\n".join(lines)


def _targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []

    def find(b: int, n: int, k: int) -> Optional[Dict[str, Any]]:
        return next((r for r in rows if (r["B"], r["N"], r["k"]) == (b, n, k)), None)

    r = find(1, 576, 144)
    if r:
        for mode in ("eager", "loop", "graph"):
            t = r[f"{mode}_us"]
            if t:
                sp = t["total_torch"] / t["total_triton"]
                out.append({"target": f"select+gather >= 5x torch at B=1,N=576,k=144 ({mode})",
                            "value": round(sp, 2), "pass": sp >= 5.0})
    small = [r for r in rows if r["N"] <= 4096]
    if small:
        worst = max(small, key=lambda r: r["eager_us"]["select_triton"])
        v = worst["eager_us"]["select_triton"]
        out.append({"target": f"select < 10 us eager device time for N <= 4096 (worst B={worst['B']},N={worst['N']},"
                              f"k={worst['k']}, {worst['score_dtype']} scores)", "value": round(v, 2), "pass": v < 10.0})
        worst32 = max(small, key=lambda r: r["eager_us"]["select_triton_fp32"])
        v32 = worst32["eager_us"]["select_triton_fp32"]
        out.append({"target": f"(info) same with fp32 scores (worst B={worst32['B']},N={worst32['N']})",
                    "value": round(v32, 2), "pass": v32 < 10.0})
        worst_l = max(small, key=lambda r: r["loop_us"]["select_triton"])
        vl = worst_l["loop_us"]["select_triton"]
        out.append({"target": f"(info) select < 10 us per call in an eager loop, host launch included (worst "
                              f"B={worst_l['B']},N={worst_l['N']})", "value": round(vl, 2), "pass": vl < 10.0})
    r = find(64, 4096, 1024)
    if r:
        for mode in ("graph", "eager", "loop"):
            t = r[f"{mode}_us"]
            if t:
                ratio = t["gather_triton"] / r["gather_floor_us"]
                out.append({"target": f"gather <= 1.25x copy floor at B=64,N=4096,k=1024 ({mode})",
                            "value": round(ratio, 3), "pass": ratio <= 1.25})
    return out


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("vprune bench kernels: no CUDA device found. This benchmark times Triton GPU kernels and needs a CUDA "
              "GPU; on a CPU, run the interpreter tests instead (pytest tests/test_kernels_*.py).", file=sys.stderr)
        return 2
    from vprune.kernels._triton import HAS_TRITON, INTERPRET, TRITON_IMPORT_ERROR
    from vprune.kernels.dispatch import backend_for

    if not HAS_TRITON:
        print(f"vprune bench kernels: triton is not importable ({TRITON_IMPORT_ERROR})", file=sys.stderr)
        return 2
    if INTERPRET:
        print("vprune bench kernels: TRITON_INTERPRET=1 is set; unset it to time compiled kernels", file=sys.stderr)
        return 2
    if backend_for(torch.zeros(1, device="cuda")) != "triton":
        print("vprune bench kernels: VPRUNE_KERNELS forces the torch path; unset it", file=sys.stderr)
        return 2
    import triton

    repeats = args.repeats or (50 if args.quick else 200)
    bs, ns = (QUICK_B, QUICK_N) if args.quick else (FULL_B, FULL_N)
    score_dtype = _DTYPES[args.score_dtype]
    bw = copy_bandwidth()
    floor = launch_floor()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write); empty Triton kernel "
          f"{floor['eager']:.1f} us eager device time, {floor['loop']:.1f} us eager loop, {floor['graph']:.1f} us in a graph",
          flush=True)
    rows = []
    for b in bs:
        for n in ns:
            for k in sorted({n // 4, n // 9}, reverse=True):
                rows.append(bench_shape(b, n, k, score_dtype, repeats, not args.no_graph, bw))
                t = rows[-1]["eager_us"]
                print(f"  B={b} N={n} k={k}: select {t['select_triton']:.1f} us (torch {t['select_torch']:.1f}), "
                      f"gather {t['gather_triton']:.1f} us (floor {rows[-1]['gather_floor_us']:.1f})", flush=True)
    targets = _targets(rows)
    result = {
        "meta": {"card": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                 "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                 "python": platform.python_version(), "date": datetime.datetime.now().astimezone().isoformat(),
                 "command": " ".join(sys.argv), "copy_bandwidth_Bps": bw, "empty_kernel_us": floor, "repeats": repeats,
                 "eager": "device time of one eager call, launched behind a 512 MB memset (do_bench method, cold L2)",
                 "loop": "back-to-back eager calls between two events / calls (max of host launch cost, device time)",
                 "graph": "calls captured in one CUDA graph, replay time / calls",
                 "torch_baseline": "scores.topk(k).indices.sort().values; torch.gather with an expanded index"},
        "rows": rows, "targets": targets,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(f"launch floor (empty Triton kernel): {floor['eager']:.1f} us eager device time, {floor['loop']:.1f} us eager "
          f"loop, {floor['graph']:.1f} us in a graph")
    print("targets:")
    for t in targets:
        print(f"  {'PASS' if t['pass'] else 'MISS'} {t['target']}: {t['value']}")
    print(f"wrote {args.out}")
    print(_table(rows, "loop"))
    print(_table(rows, "eager"))
    if not args.no_graph:
        print(_table(rows, "graph"))
    return 0
