"""Run the shipped testbed robot policy unpruned and pruned (no download, CPU, about a minute).

The policy is a tiny OpenVLA-structured VLA (timm ViT + projector + Llama LM, actions as the last
256 vocabulary ids) trained on a closed-loop 2D pick task (``vprune.testbed``). The demo runs the same
seeded episodes twice, unpruned and with ``vprune.patch(policy, keep=0.25)`` (dual-level pruning, the
default for VLAs), prints success rate, visual tokens per step, per-step latency and the share of LLM
FLOPs skipped, and writes a PNG of frames with the kept visual tokens highlighted.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional

import numpy as np


class Progress:
    """tqdm if installed (it comes with transformers), else a plain counter on one line."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n = total, desc, 0
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="ep", leave=False)
            except Exception:
                self.bar = None

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled:
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(flush=True)


def llm_step_flops(policy: Any, seq_len: int, decode_steps: int) -> int:
    """FLOPs (2 x multiply-adds) of the LLM decoder layers for one control step, unpruned:
    a prefill of ``seq_len`` tokens and ``decode_steps`` cached decode steps (matches the estimate
    the OpenVLA integration uses for ``flops_skipped``)."""
    import torch

    layers = policy.language_model.model.layers
    cfg = policy.config.text_config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    total = 0
    for layer in layers:
        params = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        pairs = seq_len * (seq_len + 1) // 2
        total += 2 * params * seq_len + 4 * heads * head_dim * pairs
        for t in range(decode_steps):
            total += 2 * params + 4 * heads * head_dim * (seq_len + t + 1)
    return int(total)


def run_config(policy: Any, processor: Any, seeds: List[int], progress: Progress,
               capture: Optional[Dict[str, Any]] = None, batch: int = 1) -> Dict[str, Any]:
    """Roll out ``seeds``; with a patched policy also read ``vprune.stats`` after every step."""
    import vprune
    from vprune.testbed.policy_rollout import rollout

    patched = vprune.is_patched(policy)
    per_step: List[Dict[str, Any]] = []

    def on_step(info: Dict[str, Any]) -> None:
        if not patched:
            per_step.append({"visual": policy.config.num_patches, "flops_skipped": 0, "pruned": False,
                             "step": info["step"]})
            return
        st = vprune.stats(policy)
        rows = st.get("per_sample") or []
        row = rows[0] if rows else {}
        per_step.append({"visual": row.get("visual_after", policy.config.num_patches),
                         "flops_skipped": int(st.get("flops_skipped", 0)) / max(1, len(rows)),
                         "pruned": bool(row.get("pruned", False)), "step": info["step"],
                         # vprune's own host time in this step, by part (timed inside the integration)
                         "overhead_ms": dict(st.get("overhead_ms") or {})})
        if capture is not None and info["episode_index"] == 0 and len(capture.setdefault("frames", [])) < 64:
            capture["frames"].append({"step": info["step"], "image": info["images"][0],
                                      "kept": vprune.viz.kept_indices_from_stats(st),
                                      "instruction": info["instructions"][0]})

    res = rollout(policy, processor, seeds, batch=batch, on_step=on_step,
                  on_episode=lambda r: progress.update(1))
    res["per_step"] = per_step
    return res


def summarize(name: str, res: Dict[str, Any], step_flops: int) -> Dict[str, Any]:
    per = res["per_step"]
    lat = np.asarray(res["step_latency_s"]) * 1e3
    pruned_lat = [l for l, p in zip(lat, per) if p["pruned"]]
    pruned_ovh = [p["overhead_ms"].get("total", 0.0) for p in per if p["pruned"] and p.get("overhead_ms")]
    return {
        "config": name,
        "success_rate": res["success_rate"],
        "episodes": len(res["episodes"]),
        "steps": len(per),
        "visual_tokens_per_step": float(np.mean([p["visual"] for p in per])) if per else 0.0,
        "latency_ms": float(np.mean(lat)) if len(lat) else 0.0,
        "latency_ms_pruned_steps": float(np.mean(pruned_lat)) if pruned_lat else None,
        "vprune_ms_pruned_steps": float(np.mean(pruned_ovh)) if pruned_ovh else None,
        "flops_skipped_frac": float(np.mean([p["flops_skipped"] for p in per]) / step_flops) if per else 0.0,
    }


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ["config", "success", "visual tok/step", "ms/step", "LLM FLOPs skipped"]
    body = [[r["config"], f"{r['success_rate'] * 100:.0f}% ({round(r['success_rate'] * r['episodes'])}/{r['episodes']})",
             f"{r['visual_tokens_per_step']:.1f}", f"{r['latency_ms']:.1f}",
             f"{r['flops_skipped_frac'] * 100:.1f}%"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_png(capture: Dict[str, Any], path: str, grid: int, title: str, n_frames: int = 4) -> Optional[str]:
    """Frames of the first pruned episode: the first one unpruned (warm-up), then pruned steps."""
    from vprune import viz

    frames = capture.get("frames") or []
    if not frames:
        return None
    pruned = [f for f in frames if f["kept"] is not None]
    chosen = [frames[0]]
    if pruned:
        picks = np.linspace(0, len(pruned) - 1, num=min(n_frames - 1, len(pruned))).round().astype(int)
        chosen += [pruned[i] for i in sorted(set(picks.tolist()))]
    images, titles = [], []
    for f in chosen:
        images.append(viz.overlay_kept_tokens(f["image"], f["kept"], grid=grid, scale=4))
        kept = grid * grid if f["kept"] is None else len(f["kept"])
        titles.append(f"step {f['step']}: {kept}/{grid * grid} tokens" + (" (warm-up)" if f["kept"] is None else ""))
    return viz.save_panel(images, path, titles=titles, caption=f"{title} -- \"{frames[0]['instruction']}\"")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--episodes", type=int, default=10, help="seeded episodes per configuration (default 10)")
    p.add_argument("--keep", type=float, default=0.25, help="fraction of visual tokens kept (default 0.25)")
    p.add_argument("--strategy", default=None,
                   help="selection strategy (default: the integration's, dual for VLAs)")
    p.add_argument("--semantic", default=None,
                   help="semantic score of dual: last (default) or prefill_mean (better on this shallow policy)")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
    p.add_argument("--png", default="vprune_demo.png", help="where to write the kept-token figure")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    import torch

    import vprune
    import vprune.viz  # noqa: F401  (used by run_config's capture)
    from vprune.testbed import load_policy, load_processor
    from vprune.testbed.sim import PickEnv
    from vprune.testbed.tokenizer import prompt_for

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    policy, processor = load_policy(), load_processor()
    seeds = list(range(args.seed, args.seed + args.episodes))
    print(f"testbed policy: {type(policy).__name__}, {policy.config.num_patches} visual tokens/step, "
          f"{len(policy.language_model.model.layers)}-layer LLM; {args.episodes} seeded episodes per config",
          flush=True)
    overrides: Dict[str, Any] = {"keep": args.keep}
    if args.strategy:
        overrides["strategy"] = args.strategy
    if args.semantic:
        overrides["semantic"] = args.semantic
    vprune.VisualPruning(**overrides)  # a bad value fails before any episode runs
    progress = Progress(2 * len(seeds), "episodes", enabled=not args.no_progress)
    # warm the kernels/allocator once so the first timed step is not an outlier
    with torch.inference_mode():
        env_obs = PickEnv().reset(10**6)
        policy.predict_action(**processor(prompt_for(env_obs["instruction"]), env_obs["image"]))
    base = run_config(policy, processor, seeds, progress)
    capture: Dict[str, Any] = {}
    vprune.patch(policy, **overrides)
    try:
        cfg = vprune.stats(policy)["config"]
        label = f"{cfg['strategy']}:{cfg['semantic']}" if args.semantic else cfg["strategy"]
        name = f"{label} {args.keep * 100:g}% (K={cfg['layer']})"
        pruned = run_config(policy, processor, seeds, progress, capture=capture)
    finally:
        vprune.unpatch(policy)
        progress.close()
    seq_len = 1 + policy.config.num_patches + (len(processor.tokenizer.encode(prompt_for("pick up the red square"))) - 1)
    step_flops = llm_step_flops(policy, seq_len, policy.get_action_dim() - 1)
    rows = [summarize("unpruned", base, step_flops), summarize(name, pruned, step_flops)]
    print(format_table(rows))
    b, q = rows
    if b["success_rate"] > 0:
        print(f"pruned keeps {q['success_rate'] / b['success_rate'] * 100:.0f}% of the unpruned success rate; "
              f"latency x{b['latency_ms'] / max(q['latency_ms'], 1e-9):.2f} "
              f"(pruned steps only: {q['latency_ms_pruned_steps'] or 0:.1f} ms; the first "
              f"{cfg.get('warmup') if cfg.get('warmup') is not None else cfg.get('history')} steps of each episode "
              f"run unpruned as warm-up)")
    if q.get("vprune_ms_pruned_steps") is not None and q.get("latency_ms_pruned_steps"):
        print(f"vprune's own time (scoring, selection, bookkeeping; timed inside the integration): "
              f"{q['vprune_ms_pruned_steps']:.2f} ms per pruned step = "
              f"{q['vprune_ms_pruned_steps'] / q['latency_ms_pruned_steps'] * 100:.1f}% of it "
              f"({torch.get_num_threads()} torch threads; `vprune eval vla` measures it episode-interleaved)")
    png = write_png(capture, args.png, grid=policy.config.image_size // policy.config.patch_size, title=name)
    if png:
        print(f"kept-token figure: {png}")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": time.perf_counter() - t0}, f, indent=1)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
