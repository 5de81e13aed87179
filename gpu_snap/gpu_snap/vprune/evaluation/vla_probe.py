"""Which visual tokens does each pruning config keep on the testbed policy? (target and gripper coverage)

    python -m vprune.evaluation.vla_probe [--episodes 50] [--keep 0.25]

Runs seeded closed-loop episodes of the testbed policy patched with each configuration (default: dual
with the last-row and the prefill-mean semantic score, fastv, random; K = the integration's default)
and, at every pruned control step, reads the kept visual tokens from ``vprune.stats`` and the frame's
per-patch content (``train_policy.patch_classes``: which patches show the target object, which the
gripper). It reports the share of the target's patches and of the gripper's patches that the keep set
covers, next to the success rate and the share a random choice covers on average (keep / tokens).
This explains the success rates of ``vprune eval vla`` (an analysis tool, not part of pruning).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional

import numpy as np
import torch

DEFAULT_CONFIGS = ("dual", "dual:prefill_mean", "fastv", "random")


def _parse_config(text: str, keep: float, layer: Optional[int]) -> Dict[str, Any]:
    """"strategy" or "strategy:semantic" -> ``vprune.patch`` keyword arguments."""
    from vprune.evaluation.vla import strategy_kwargs

    kw: Dict[str, Any] = {"keep": keep, **strategy_kwargs(text)}
    if layer is not None:
        kw["layer"] = layer
    return kw


def probe_config(policy: Any, processor: Any, seeds: List[int], kw: Dict[str, Any], batch: int = 10) -> Dict[str, Any]:
    """Success rate and mean keep-set coverage of the target's / gripper's patches over pruned steps."""
    import vprune
    from vprune.testbed.policy_rollout import rollout
    from vprune.testbed.sim import COLORS
    from vprune.testbed.train_policy import patch_classes

    colour_class = {name: i + 1 for i, name in enumerate(COLORS)}
    gripper_class = len(COLORS) + 1
    patch = policy.config.patch_size if hasattr(policy.config, "patch_size") else 8
    target_cover: List[float] = []
    gripper_cover: List[float] = []
    kept_share: List[float] = []

    def on_step(info: Dict[str, Any]) -> None:
        per_sample = vprune.stats(policy)["per_sample"]
        classes = patch_classes(np.stack(info["images"]), patch)  # [rows, tokens]
        for row, sample in enumerate(per_sample):
            if not sample["pruned"] or sample["warmup"]:
                continue
            kept = np.zeros(classes.shape[1], dtype=bool)
            kept[sample["kept_indices"]] = True
            kept_share.append(kept.mean())
            colour = info["instructions"][row].split()[3]
            for cls, out in ((colour_class[colour], target_cover), (gripper_class, gripper_cover)):
                where = classes[row] == cls
                if where.any():
                    out.append(float(kept[where].mean()))

    vprune.patch(policy, **kw)
    try:
        res = rollout(policy, processor, seeds, batch=batch, on_step=on_step)
        layer = vprune.stats(policy)["layer"]
    finally:
        vprune.unpatch(policy)
    return {"success_rate": res["success_rate"], "layer": layer, "pruned_steps": len(kept_share),
            "target_patches_kept": float(np.mean(target_cover)) if target_cover else float("nan"),
            "gripper_patches_kept": float(np.mean(gripper_cover)) if gripper_cover else float("nan"),
            "tokens_kept": float(np.mean(kept_share)) if kept_share else float("nan")}


def main(argv: Any = None) -> int:
    from vprune.testbed import load_policy, load_processor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--layer", type=int, default=None, help="pruning layer K (default: the integration's)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="strategy or strategy:semantic, comma-separated (default %(default)s)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    policy, processor = load_policy(), load_processor()
    seeds = list(range(args.episodes))
    rows = {}
    print(f"testbed policy, {args.episodes} seeded episodes, keep {args.keep:g}; coverage = share of the "
          "object's patches in the keep set, mean over pruned steps")
    print("| config | K | success | target patches kept | gripper patches kept | tokens kept |")
    print("| --- | --- | --- | --- | --- | --- |")
    for text in args.configs.split(","):
        r = probe_config(policy, processor, seeds, _parse_config(text, args.keep, args.layer))
        rows[text] = r
        print(f"| {text} | {r['layer']} | {r['success_rate']:.0%} | {r['target_patches_kept']:.0%} | "
              f"{r['gripper_patches_kept']:.0%} | {r['tokens_kept']:.0%} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"episodes": args.episodes, "keep": args.keep, "configs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
