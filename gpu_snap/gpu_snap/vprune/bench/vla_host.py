"""Where the patched OpenVLA-7B-shaped control step spends host time: an A/B of the integration's
switches on one GPU (diagnostic for ``vprune bench vla``).

    python -m vprune.bench.vla_host                     # keep 25%, K=3, 40 interleaved rounds
    python -m vprune.bench.vla_host --keep 0.125 --rounds 60

Variants (one set of weights; each patched variant is its own ``shared_clone``, patched once and run
past its warm-up): ``unpatched``; ``short`` (the LM sees only [BOS, k patches, prompt]: the host
work of a shorter input without vprune); ``patched`` (the defaults); ``patched:torch_select``
(``openvla._HOST_SELECT`` off: dual's greedy loop as torch ops on the device);
``patched:per_row_decode`` (``openvla._BATCHED_DECODE`` off: each decode row scored in its forward);
``patched:recomputed_queries`` (``openvla._HANDED_QUERIES`` off: every scored row's query recomputed
with q_proj + RoPE instead of taken from its layer).
The switches are set right before each call. Per variant: wall ms (median and IQR of interleaved
rounds, device synchronised around each call), vprune's own host time per step by part (the
integration's timers, ``vprune.stats(model)["overhead_ms"]``), CUDA kernel launches per step (``cudaLaunchKernel`` /
``cuLaunchKernel`` calls in a torch.profiler trace) and host syncs (``cudaStreamSynchronize`` /
``cudaDeviceSynchronize`` / ``cudaMemcpy`` non-async calls). Then cProfile of the default patched
step: vprune's functions by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from typing import Any, Callable, Dict

import torch

from .vla import OPENVLA_7B, build_policy, policy_inputs
from .vlm import interleaved, shared_clone, summarize

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")

#: variant -> the openvla switches it runs with
SWITCHES = {
    "patched": {"_HOST_SELECT": True, "_BATCHED_DECODE": True, "_HANDED_QUERIES": True},
    "patched:torch_select": {"_HOST_SELECT": False, "_BATCHED_DECODE": True, "_HANDED_QUERIES": True},
    "patched:per_row_decode": {"_HOST_SELECT": True, "_BATCHED_DECODE": False, "_HANDED_QUERIES": True},
    "patched:recomputed_queries": {"_HOST_SELECT": True, "_BATCHED_DECODE": True, "_HANDED_QUERIES": False},
}


def _runtime_calls(fn: Callable[[], Any]) -> Dict[str, int]:
    """CUDA runtime / driver calls of one ``fn()``: kernel launches and synchronising calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launches = syncs = 0
    for ev in prof.events():
        if ev.name in _LAUNCHES:
            launches += 1
        elif ev.name in _SYNCS:
            syncs += 1
    return {"launches": launches, "syncs": syncs}


def _profile_diff(a: cProfile.Profile, b: cProfile.Profile, steps: int, top: int) -> str:
    """Per-step tottime of every function in ``a`` minus in ``b`` (ms), largest differences first."""
    sa, sb = pstats.Stats(a).stats, pstats.Stats(b).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    ta, tb = ({k: v[2] for k, v in st.items()} for st in (sa, sb))
    ca, cb = ({k: v[1] for k, v in st.items()} for st in (sa, sb))
    diff = sorted(((ta.get(k, 0.0) - tb.get(k, 0.0)) * 1e3 / steps, k) for k in set(ta) | set(tb))
    lines = [f"  total {sum(ta.values()) * 1e3 / steps:.1f} vs {sum(tb.values()) * 1e3 / steps:.1f} ms per step"]
    for d, k in sorted(diff, key=lambda x: -abs(x[0]))[:top]:
        where = f"{k[0].split('site-packages/')[-1]}:{k[1]}({k[2]})"
        lines.append(f"  {d:+8.3f}  calls {(ca.get(k, 0) - cb.get(k, 0)) / steps:+8.1f}  {where}")
    return "\n".join(lines)


def main(argv: Any = None) -> Dict[str, Any]:
    import vprune
    from vprune.integrations import openvla

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--layer", type=int, default=OPENVLA_7B["layer"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("vla_host needs a CUDA device")
    device = torch.device("cuda")
    t0 = time.time()
    policy = build_policy(OPENVLA_7B, device, torch.bfloat16)
    inputs = policy_inputs(OPENVLA_7B, 1, device, torch.bfloat16)
    k = max(1, int(round(args.keep * policy.num_patches)))
    clones: Dict[str, Any] = {"unpatched": policy}
    short = shared_clone(policy)
    short.projector.register_forward_hook(lambda mod, a, out: out[:, :k])
    clones["short"] = short
    for name in SWITCHES:
        clones[name] = vprune.patch(shared_clone(policy), vprune.VisualPruning(keep=args.keep, layer=args.layer))
    defaults = {flag: getattr(openvla, flag) for flag in SWITCHES["patched"]}

    def step(name: str) -> Callable[[], Any]:
        model, switches = clones[name], SWITCHES.get(name, defaults)

        def run() -> Any:
            for flag, value in switches.items():
                setattr(openvla, flag, value)
            with torch.no_grad():
                return model.predict_action(**inputs, unnorm_key="bench")
        return run

    variants = {name: step(name) for name in clones}
    try:
        for name in SWITCHES:  # past the warm-up: every timed step is pruned
            for _ in range(4):
                variants[name]()
            if not vprune.stats(clones[name])["per_sample"][0]["pruned"]:
                raise SystemExit(f"{name}: the step after the warm-up was not pruned")
        times = interleaved(variants, device, args.warmup, args.rounds, args.seed)
        calls = {name: _runtime_calls(fn) for name, fn in variants.items()}
        own: Dict[str, Dict[str, float]] = {}  # vprune's own host time per step, by part (its timers)
        for name in SWITCHES:
            parts: Dict[str, float] = {}
            for _ in range(10):
                variants[name]()
                for part, ms in vprune.stats(clones[name])["overhead_ms"].items():
                    parts[part] = parts.get(part, 0.0) + ms / 10
            own[name] = parts
        profiles = {}
        for name in ("short", "patched"):
            profiles[name] = prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                variants[name]()
            torch.cuda.synchronize()
            prof.disable()
        prof = profiles["patched"]
    finally:
        for flag, value in defaults.items():
            setattr(openvla, flag, value)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(r"^(?!.*site-packages).*/(vprune|integrations)/", 25)
    rows = {name: {**summarize(t), **calls[name], "vprune_ms": own.get(name)} for name, t in times.items()}
    print(f"OpenVLA-7B-shaped control step, batch 1, keep {args.keep:g} (k={k}), K={args.layer}, "
          f"{args.rounds} interleaved rounds, {torch.cuda.get_device_name()}")
    print(f"{'variant':24s} {'wall ms':>9s} {'IQR':>7s} {'min':>7s} {'launches':>9s} {'syncs':>6s}  vprune's timers (ms)")
    for name, r in rows.items():
        mine = r["vprune_ms"]
        print(f"{name:24s} {r['ms']:9.1f} {r['iqr_ms']:7.1f} {r['min_ms']:7.1f} {r['launches']:9d} {r['syncs']:6d}  "
              + ("-" if not mine else ", ".join(f"{k} {v:.2f}" for k, v in mine.items())))
    print("cProfile of 5 default patched steps (vprune's functions, cumulative):")
    print(text.getvalue()[-6000:])
    print("host time patched - short per step by function (cProfile tottime, ms; the 30 largest differences):")
    print(_profile_diff(profiles["patched"], profiles["short"], steps=5, top=30))
    result = {"card": torch.cuda.get_device_name(), "keep": args.keep, "k": k, "layer": args.layer,
              "rounds": args.rounds, "rows": rows, "seconds": time.time() - t0,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "date": time.strftime("%Y-%m-%d"), "command": "python -m vprune.bench.vla_host " + " ".join(argv or [])}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
