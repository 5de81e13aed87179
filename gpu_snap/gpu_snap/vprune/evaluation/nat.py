"""Quality of NATCache modes on the shipped testbed MaskGIT (CPU, deterministic, no download).

    vprune eval nat [--quick] [--samples 200] [--steps 12] [--guidance 3] [--configs cache:4,...] [--json out.json]

Generates ``--samples`` token grids (classes balanced) with the testbed sampler (cosine schedule,
classifier-free guidance as one concatenated batch) unpatched and under each ``mode:refresh``
config, with the same seed (so every setting consumes the same random numbers and differences come
from the model's outputs only), and reports for each:

* accuracy: the metric classifier (trained on real token grids) agrees with the requested class;
* fd: Frechet distance between the classifier's hidden features of the samples and of 2000 held-out
  real samples (lower is better);
* computed: fraction of token-block computations performed (1.0 = vanilla);
* the relative change of both vs vanilla (the targets: cache/disentangle within 5%, reuse 10%).

``disentangle:1`` is the uncached reference of the disentangled pattern: ``disentangle:R`` must
match it exactly (``identical_to`` column).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any, Dict, List

import torch

DEFAULT_CONFIGS = "cache:2,cache:4,cache:12,disentangle:1,disentangle:12,reuse:2,reuse:3,reuse:4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="100 samples, configs cache:4,disentangle:12,reuse:3")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=None, help=f"mode:refresh list (default {DEFAULT_CONFIGS})")
    p.add_argument("--json", default="eval_nat.json", help="output JSON (default eval_nat.json)")


def evaluate(configs: List[str], samples: int = 200, steps: int = 12, guidance: float = 3.0,
             seed: int = 0) -> List[Dict[str, Any]]:
    """One row per setting ("vanilla" first); plain Python values."""
    import vprune
    from vprune.testbed import maskgit as mg

    model, clf = mg.load_pretrained()
    metric = mg.QualityMetric(clf)
    labels = torch.arange(samples) % mg.NUM_CLASSES
    rows: List[Dict[str, Any]] = []
    outputs: Dict[str, torch.Tensor] = {}
    for name in ["vanilla"] + configs:
        t0 = time.perf_counter()
        if name == "vanilla":
            toks = mg.sample(model, labels, steps=steps, guidance=guidance, seed=seed)
            frac = 1.0
        else:
            mode, _, refresh = name.partition(":")
            with vprune.patched(model, vprune.NATCache(mode=mode, refresh=int(refresh or 4))):
                toks = mg.sample(model, labels, steps=steps, guidance=guidance, seed=seed)
                frac = vprune.stats(model)["tokens_computed_fraction"]
        row: Dict[str, Any] = {"setting": name, "computed": frac, "seconds": time.perf_counter() - t0}
        row.update(metric(toks, labels))
        row["same_tokens_as_vanilla"] = float((toks == outputs["vanilla"]).float().mean()) if outputs else 1.0
        if name.startswith("disentangle:") and "disentangle:1" in outputs and name != "disentangle:1":
            row["identical_to"] = "disentangle:1" if torch.equal(toks, outputs["disentangle:1"]) else None
        outputs[name] = toks
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["accuracy_rel"] = r["accuracy"] / base["accuracy"] - 1.0 if base["accuracy"] else None
        r["fd_rel"] = r["fd"] / base["fd"] - 1.0 if base["fd"] else None
    return rows


def run(args: argparse.Namespace) -> int:
    import vprune
    from vprune.testbed import maskgit as mg

    torch.set_num_threads(1)
    if args.quick:
        args.samples = min(args.samples, 100)
        configs = (args.configs or "cache:4,disentangle:12,reuse:3").split(",")
    else:
        configs = (args.configs or DEFAULT_CONFIGS).split(",")
    try:
        rows = evaluate(configs, args.samples, args.steps, args.guidance, args.seed)
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"{'setting':<16} {'accuracy':>8} {'rel':>7} {'fd':>8} {'rel':>7} {'computed':>8} {'same tok':>8}")
    for r in rows:
        print(f"{r['setting']:<16} {r['accuracy']:>8.3f} {r['accuracy_rel']:>+7.1%} {r['fd']:>8.2f} {r['fd_rel']:>+7.1%} "
              f"{r['computed']:>8.2f} {r['same_tokens_as_vanilla']:>8.2f}"
              + (f"  == {r['identical_to']}" if r.get("identical_to") else ""))
    report = {"evaluation": "nat", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "samples": args.samples, "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "weights": mg.WEIGHTS,
              "versions": {"torch": torch.__version__, "vprune": vprune.__version__}, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0
