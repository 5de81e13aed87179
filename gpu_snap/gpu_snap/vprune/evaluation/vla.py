"""Success rate of the testbed robot policy over keep ratios x selection strategies (seeded).

Runs the shipped OpenVLA-structured testbed policy (``vprune.testbed``) in its closed-loop 2D pick
task: the same seeded episodes unpruned and for every (strategy, keep) pair, through
``vprune.patch(policy, keep=..., strategy=...)``. Prints a table of success rates (and the share of
the unpruned rate kept), writes a plot (PNG) and checks the targets:

- dual at 25% keeps >= 95% of the unpruned success rate;
- dual beats fastv at 12.5%;
- per-step pruning overhead (scoring + selection + diversity, timed inside the integration and read
  from ``vprune.stats``) < 5% of the pruned step time (batch 1, CPU); also printed: all of vprune's
  code per step and the end-to-end pruned vs unpruned step time (see ``measure_overhead``).

Episodes run in lock-step batches (``--batch``; every row is its own environment with its own
temporal history); latencies and the overhead are measured separately at batch 1.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List, Optional

import numpy as np


def _parse_list(text: str, cast: Any) -> List[Any]:
    return [cast(t) for t in text.split(",") if t.strip()]


def strategy_kwargs(spec: str) -> Dict[str, Any]:
    """"dual" or "dual:prefill_mean" (strategy[:semantic score]) -> ``vprune.patch`` keyword arguments."""
    name, sep, semantic = spec.partition(":")
    if not name or (sep and not semantic):
        raise ValueError(f"strategy {spec!r}: expected a strategy name, optionally ':' and a semantic score "
                         "(e.g. dual or dual:prefill_mean)")
    kw: Dict[str, Any] = {"strategy": name}
    if semantic:
        kw["semantic"] = semantic
    return kw


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--episodes", type=int, default=50, help="seeded episodes per configuration (default 50)")
    p.add_argument("--keeps", default="1.0,0.5,0.25,0.125", help="keep fractions (default 1.0,0.5,0.25,0.125)")
    p.add_argument("--strategies", default="random,fastv,divprune,dual",
                   help="selection strategies, each optionally with ':' and a semantic score, e.g. "
                        "dual:prefill_mean (default random,fastv,divprune,dual)")
    p.add_argument("--batch", type=int, default=10, help="environments stepped together (default 10)")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
    p.add_argument("--layer", type=int, default=None, help="pruning layer K (default: the integration's)")
    p.add_argument("--overhead-episodes", type=int, default=3,
                   help="batch-1 episodes of dual at 25%% timed for the overhead check (0: skip)")
    p.add_argument("--overhead-strategy", default="dual",
                   help="the dual variant timed for the overhead check (default dual; e.g. dual:prefill_mean)")
    p.add_argument("--plot", default="vprune_eval_vla.png", help="where to write the plot")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def measure_overhead(policy: Any, processor: Any, seeds: List[int], layer: Optional[int],
                     spec: str = "dual") -> Dict[str, Any]:
    """Batch 1, ``spec`` (dual or dual:<semantic>) at 25%: vprune's own time per pruned step, and pruned
    vs unpruned step time.

    vprune's time is read from ``vprune.stats(policy)["overhead_ms"]`` after every step: host time
    (perf_counter) the integration spends in its own code, by part: "scoring" (attention rows at the
    semantic and action layers), "selection" (top-k, union, diversity, keep indices) and "other" (input
    checks, history update, gathers for the pruned layers). It is divided by the wall time of the same
    pruned steps (``predict_action``); warm-up steps (unpruned) are left out. The end-to-end comparison
    runs each seed unpruned, then pruned, episode by episode (load drifts between episodes, not within),
    and compares steps past the warm-up. Both numbers share the machine's noise: repeat on a busy host.
    """
    import torch

    import vprune
    from vprune.demo import run_config, Progress

    kw: Dict[str, Any] = {"keep": 0.25, **strategy_kwargs(spec)}
    if layer is not None:
        kw["layer"] = layer
    warmup = None
    base_lat: List[float] = []
    lat: List[float] = []
    parts: Dict[str, float] = {}
    off = Progress(1, "overhead", enabled=False)
    for seed in seeds:
        base = run_config(policy, processor, [seed], off)
        vprune.patch(policy, **kw)
        try:
            warmup = vprune.stats(policy)["config"].get("warmup")
            res = run_config(policy, processor, [seed], off)
        finally:
            vprune.unpatch(policy)
        for l, p in zip(res["step_latency_s"], res["per_step"]):
            if p["pruned"]:
                lat.append(l)
                for k, v in (p.get("overhead_ms") or {}).items():
                    parts[k] = parts.get(k, 0.0) + v / 1e3
        w = 3 if warmup is None else warmup
        base_lat += [l for l, p in zip(base["step_latency_s"], base["per_step"]) if p["step"] > w]
    total = float(sum(lat))
    n = max(1, len(lat))
    spent = parts.get("total", 0.0)
    core = parts.get("scoring", 0.0) + parts.get("selection", 0.0)
    pruned_ms = total / n * 1e3 if lat else None
    base_ms = float(np.mean(base_lat)) * 1e3 if base_lat else None
    return {
        "measured": bool(lat) and "total" in parts,
        "strategy": spec,
        "threads": torch.get_num_threads(),
        "pruned_steps": len(lat),
        "pruned_step_ms": pruned_ms,
        "unpruned_step_ms": base_ms,
        "end_to_end_frac": (pruned_ms - base_ms) / pruned_ms if pruned_ms and base_ms else None,
        "overhead_ms_per_step": spent / n * 1e3,
        "scoring_selection_ms_per_step": core / n * 1e3,
        "by_part_ms_per_step": {k: v / n * 1e3 for k, v in parts.items() if k != "total"},
        "overhead_frac": spent / total if total > 0 and lat else None,
        "scoring_selection_frac": core / total if total > 0 and lat else None,
    }


def format_table(keeps: List[float], strategies: List[str], table: Dict[str, Dict[float, float]],
                 base: float) -> str:
    head = ["strategy"] + [f"{k * 100:g}%" for k in keeps]
    rows = []
    for s in strategies:
        cells = [s]
        for k in keeps:
            v = table[s].get(k)
            rel = f" ({v / base * 100:.0f}%)" if base > 0 and v is not None else ""
            cells.append("-" if v is None else f"{v * 100:.0f}%{rel}")
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run(args: argparse.Namespace) -> int:
    import torch

    import vprune
    from vprune import viz
    from vprune.demo import Progress
    from vprune.testbed import load_policy, load_processor
    from vprune.testbed.policy_rollout import rollout

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    keeps = sorted(_parse_list(args.keeps, float), reverse=True)
    strategies = _parse_list(args.strategies, str)
    for spec in strategies + [args.overhead_strategy]:
        vprune.VisualPruning(**strategy_kwargs(spec))  # bad specs fail before any episode runs
    policy, processor = load_policy(), load_processor()
    seeds = list(range(args.seed, args.seed + args.episodes))
    pruned_keeps = [k for k in keeps if k < 1.0]
    n_runs = 1 + len(strategies) * len(pruned_keeps)
    print(f"vprune eval vla: testbed policy, {args.episodes} seeded episodes x {n_runs} configurations "
          f"(batch {args.batch})", flush=True)
    progress = Progress(n_runs * len(seeds), "episodes", enabled=not args.no_progress)
    tick = lambda r: progress.update(1)  # noqa: E731

    results: Dict[str, Any] = {"episodes": args.episodes, "seed": args.seed, "configs": []}
    base = rollout(policy, processor, seeds, batch=args.batch, on_episode=tick)
    base_rate = base["success_rate"]
    results["configs"].append({"strategy": None, "keep": 1.0, "success_rate": base_rate})
    table: Dict[str, Dict[float, float]] = {s: {} for s in strategies}
    for s in strategies:
        if 1.0 in keeps:
            table[s][1.0] = base_rate  # keep=1.0 is bit-identical to the unpruned policy
    layer_used = None
    for s in strategies:
        for k in pruned_keeps:
            kw: Dict[str, Any] = {"keep": k, **strategy_kwargs(s)}
            if args.layer is not None:
                kw["layer"] = args.layer
            vprune.patch(policy, **kw)
            try:
                layer_used = vprune.stats(policy)["config"]["layer"]
                res = rollout(policy, processor, seeds, batch=args.batch, on_episode=tick)
            finally:
                vprune.unpatch(policy)
            table[s][k] = res["success_rate"]
            results["configs"].append({"strategy": s, "keep": k, "success_rate": res["success_rate"],
                                       "failed_seeds": [e["seed"] for e in res["episodes"] if not e["success"]]})
    progress.close()
    results["layer"] = layer_used
    results["unpruned_success_rate"] = base_rate
    print(f"success rate over {args.episodes} seeded episodes (share of unpruned in brackets), "
          f"pruning from layer K={layer_used}:")
    print(format_table(keeps, strategies, table, base_rate))

    overhead = None
    duals = [s for s in strategies if strategy_kwargs(s)["strategy"] == "dual"]
    if args.overhead_episodes > 0 and duals:
        overhead = measure_overhead(policy, processor, seeds[:args.overhead_episodes], args.layer,
                                    args.overhead_strategy)
        results["overhead"] = overhead

    checks: List[Dict[str, Any]] = []
    for d_spec in duals:
        if 0.25 in table[d_spec]:
            v = table[d_spec][0.25]
            checks.append({"target": f"{d_spec} @25% >= 95% of unpruned success",
                           "value": f"{v * 100:.0f}% vs {base_rate * 100:.0f}%",
                           "ok": base_rate > 0 and v >= 0.95 * base_rate})
        if "fastv" in strategies and 0.125 in table[d_spec] and 0.125 in table["fastv"]:
            d, f = table[d_spec][0.125], table["fastv"][0.125]
            checks.append({"target": f"{d_spec} > fastv @12.5%", "value": f"{d * 100:.0f}% vs {f * 100:.0f}%",
                           "ok": d > f})
    if overhead is not None and overhead["scoring_selection_frac"] is not None:
        o = overhead
        checks.append({"target": f"pruning overhead of {o['strategy']} (scoring + selection + diversity) < 5% "
                                 "of the pruned step time (batch 1)",
                       "value": f"{o['scoring_selection_ms_per_step']:.2f} ms of {o['pruned_step_ms']:.1f} ms "
                                f"({o['scoring_selection_frac'] * 100:.1f}%; all of vprune's code "
                                f"{o['overhead_ms_per_step']:.2f} ms = {o['overhead_frac'] * 100:.1f}%; "
                                f"{o['threads']} torch threads)",
                       "ok": o["scoring_selection_frac"] < 0.05})
        if o["unpruned_step_ms"] is not None:
            print(f"step time past the warm-up, episode-interleaved: pruned {o['pruned_step_ms']:.1f} ms, unpruned "
                  f"{o['unpruned_step_ms']:.1f} ms ({o['end_to_end_frac'] * 100:+.1f}% of the pruned step)")
    results["checks"] = checks
    for c in checks:
        print(f"[{'ok' if c['ok'] else 'MISSED'}] {c['target']}: {c['value']}")

    series = {s: [table[s].get(k) for k in keeps] for s in strategies}
    viz.line_plot([f"{k * 100:g}%" for k in keeps], series, args.plot,
                  title=f"testbed VLA: success rate vs visual tokens kept ({args.episodes} episodes, K={layer_used})",
                  ylabel="visual tokens kept")
    print(f"plot: {args.plot}")
    results["seconds"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"done in {results['seconds']:.0f} s")
    return 0
