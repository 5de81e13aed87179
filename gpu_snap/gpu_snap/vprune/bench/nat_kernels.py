"""GPU kernel time of one aMUSEd-256-shaped step, vanilla vs a NATCache cheap step, by kernel name.

    python3 -m vprune.bench.nat_kernels [--batch 32] [--top 25]     # GPU, diffusers; under a minute

Eager steps are launch-bound, so per-module wall or CUDA-event times hide where the GPU works. This
sums the profiler's device time of every kernel (and memcpy/memset) of one step: a vanilla forward on
a half-masked grid plus ``AmusedScheduler.step``, and a cheap step of ``NATCache(mode)`` (k computed
rows, after a restart and a full step) plus the same scheduler step. The totals are what a CUDA-graph
replay of each step costs at best; the per-kernel table shows which work did not shrink with k.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from typing import Any, Callable, Dict

import torch


def _kernel_times(fn: Callable[[], Any], setup: Callable[[], Any] = lambda: None) -> Dict[str, float]:
    """Device microseconds per kernel name over one call of ``fn`` (each call preceded by ``setup()``,
    which is not profiled; two warm-up rounds)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        setup()
        fn()
    setup()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    times: Dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            times[ev.get("name", "?")[:90]] += float(ev.get("dur", 0.0))
    return dict(times)


def main(argv: Any = None) -> int:
    from diffusers import AmusedScheduler, UVit2DModel

    import vprune
    from vprune.bench.nat import _inputs
    from vprune.integrations.amused import amused_256_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.float16
    cfg = amused_256_config()
    torch.manual_seed(0)
    model = UVit2DModel(**cfg).to(dev, dtype).eval()
    sched = AmusedScheduler(mask_token_id=cfg["vocab_size"] - 1)
    mask_id, side, b = cfg["vocab_size"] - 1, cfg["sample_size"], args.batch
    n = side * side
    ehs, pooled, mc = _inputs(b, cfg, 0.0, dev, dtype)
    ids = torch.randint(0, cfg["codebook_size"], (b, side, side), device=dev)

    def masked(count: int) -> torch.Tensor:
        x = ids.clone()
        x.view(b, -1)[:, :count] = mask_id
        return x

    def step(x: torch.Tensor) -> None:
        logits = model(x, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)
        sched.set_timesteps(12, (2, 0), dev)
        sched.step(model_output=logits, timestep=sched.timesteps[3], sample=x,
                   generator=torch.Generator(dev).manual_seed(0))

    half = masked(n // 2)
    tables: Dict[str, Dict[str, float]] = {}
    with torch.inference_mode():
        tables["vanilla"] = _kernel_times(lambda: step(half))
        for mode, n_now in (("cache", n * 25 // 64), ("reuse", n * 15 // 128)):
            with vprune.patched(model, vprune.NATCache(mode=mode, refresh=1000)):
                prev, now = masked(n // 2), masked(n_now)

                def setup() -> None:
                    vprune.reset(model)
                    model(masked(n), micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)
                    model(prev, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)
                times = _kernel_times(lambda: step(now), setup)
                k = model._vprune.runtime.history[-1]["k"]
                tables[f"{mode}_k{k}"] = times
    print(f"aMUSEd-256-shaped UVit2DModel, fp16, batch {b}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    names = list(tables)
    print("total device ms per step: " + ", ".join(f"{k} {sum(v.values()) / 1e3:.2f}" for k, v in tables.items()))
    ranked = sorted(set().union(*tables.values()), key=lambda nm: -max(t.get(nm, 0.0) for t in tables.values()))
    print("| kernel | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for nm in ranked[:args.top]:
        print(f"| {nm} | " + " | ".join(f"{tables[t].get(nm, 0.0) / 1e3:.3f}" for t in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
