"""Testbed VLM accuracy under visual token pruning: keep x strategy grid (CPU, seeded, no download).

    vprune eval vlm                               # 1000 held-out questions, writes results/vlm_eval.{json,md,png}
    vprune eval vlm --quick                       # 200 questions
    vprune eval vlm --keep 1 0.25 --strategies fastv random

The shipped testbed VLM (``vprune.testbed.vlm``: a trained tiny ``LlavaForConditionalGeneration``,
64 visual tokens per image, 4 decoder layers) answers single-word questions about rendered scenes
(``vprune.testbed.vqa``); accuracy is exact match of the greedy answer (``generate``, one new
token). Each (keep, strategy) cell patches the model with ``VisualPruning(keep, layer=K,
strategy, seed)``, answers every question, and unpatches. keep=100% is the unpatched model (and a
patched keep=1.0 run checks the predictions are identical).

Strategies: ``random``, ``fastv`` (last prompt row's attention at layer K-1), ``semantic`` (mean
over the text rows), ``divprune`` (max-min diversity of the layer-0 visual embeddings) and
``dual-nh`` (dual without history: VLA-Pruner's dual selection with no action steps, i.e. the union
of the top-M by the last-row score and the top-M by the text-rows mean score, cut to M by greedy
max-min cosine diversity over the layer-0 visual embeddings). When the LLaVA integration has no
"dual" strategy for VLMs, ``dual-nh`` is run through an evaluation-local override of the patched
model's pruner (scoring at layer K-1 and selection only; everything else is the integration's);
the output says which path ran.

Baselines in the output: the text-only prior (the best guess from the question text alone, fitted on
training questions), the trained model given a blank image, and chance.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

STRATEGIES = ("random", "fastv", "semantic", "divprune", "dual-nh")
KEEPS = (1.0, 0.5, 0.25, 0.125, 0.05)
DEFAULT_OUT = "results/vlm_eval"


# ------------------------------------------------------------------------- dual without history
def _install_dual_no_history(model: Any) -> str:
    """Turn a model patched with ``strategy="semantic"`` into dual-without-history (evaluation only).

    The pruner scores the text rows at layer K-1 (row mode "text"); the override keeps two scores
    from those rows: the last row's (FastV's) and the text-rows mean; captures the layer-0 inputs
    as embeddings; and selects with ``vprune.selection.dual_select``. The extra layer-0 hook goes
    into the patch's undo log, so ``vprune.unpatch`` removes it. Returns a description.
    """
    from vprune import scoring, selection
    from vprune.kernels import gather_rows, select_topk

    state = model.__dict__["_vprune"]
    pruner = state.runtime
    if getattr(pruner, "row_mode", None) != "text":
        raise RuntimeError("dual-nh override needs a model patched with strategy='semantic' (text rows)")

    def score(plan, query, key, scale):
        n = plan.seq_len
        key = key[:, :, :n]
        q_rows = gather_rows(query, plan.score_rows, dim=2)
        cols = torch.arange(n, device=query.device)
        allowed = cols.view(1, 1, n) <= plan.score_rows.unsqueeze(-1)
        if plan.key_valid is not None:
            allowed = allowed & plan.key_valid.unsqueeze(1)
        probs = scoring.attention_rows(q_rows, key, allowed.unsqueeze(1), scale=scale).mean(dim=1)  # [B, R, N]
        w = plan.row_weights.to(probs.dtype)
        text_mean = (probs * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        last_row = (plan.row_weights > 0).sum(dim=1) - 1  # text rows ascend: the last real row
        pruner.call.eval_last_row = probs[torch.arange(probs.shape[0], device=probs.device), last_row]
        return text_mean

    def select(call):
        plan = call.plan
        device = plan.visual.device
        keep_mask = ~plan.visual
        if call.scores is None or call.embeddings is None:
            raise RuntimeError("dual-nh: layer K-1 scores or layer-0 embeddings were not seen in this call")
        for bucket in plan.buckets:
            at = (bucket.rows.unsqueeze(1), bucket.positions)
            local = selection.dual_select(call.eval_last_row[at], call.scores[at], call.embeddings[at], bucket.k)
            kept = bucket.positions.gather(1, local)
            keep_mask = keep_mask.index_put((bucket.rows.unsqueeze(1).expand_as(kept), kept),
                                            torch.ones((), dtype=torch.bool, device=device))
        keep = select_topk(keep_mask.to(torch.float32), plan.keep_len)
        call.kept_visual = keep_mask & plan.visual
        return keep

    state.undo.set_attr(pruner, "_score", score)
    state.undo.set_attr(pruner, "_select", select)
    state.undo.add_hook(pruner.layers[0].register_forward_pre_hook(pruner._layer0_pre_hook, with_kwargs=True))
    return "evaluation-local override (the llava integration has no VLM 'dual' strategy)"


def patch_for(model: Any, strategy: str, keep: float, layer: int, seed: int) -> str:
    """Patch ``model`` for one grid cell; returns how the strategy was applied."""
    import vprune

    if strategy != "dual-nh":
        vprune.patch(model, vprune.VisualPruning(keep=keep, layer=layer, strategy=strategy, seed=seed))
        return "integration"
    try:
        from vprune.integrations._llm_pruning import VLM_STRATEGIES
    except Exception:  # pragma: no cover - the integration moved: try the public route below
        VLM_STRATEGIES = ()
    if "dual" in VLM_STRATEGIES:
        vprune.patch(model, vprune.VisualPruning(keep=keep, layer=layer, strategy="dual", seed=seed))
        return "integration (strategy 'dual')"
    vprune.patch(model, vprune.VisualPruning(keep=keep, layer=layer, strategy="semantic", seed=seed))
    try:
        return _install_dual_no_history(model)
    except BaseException:
        vprune.unpatch(model)
        raise


# ------------------------------------------------------------------------------------ the grid
def _paths(weights_dir: Optional[str]) -> Dict[str, str]:
    from vprune.testbed import vlm as V

    if weights_dir is None:
        return {"weights": V.WEIGHTS_PATH, "config": V.CONFIG_PATH, "tokenizer": V.TOKENIZER_PATH}
    return {"weights": os.path.join(weights_dir, "vlm.safetensors"),
            "config": os.path.join(weights_dir, "vlm_config.json"),
            "tokenizer": os.path.join(weights_dir, "vlm_tokenizer.json")}


def load(weights_dir: Optional[str] = None, device: str = "cpu"):
    """The shipped testbed VLM, or the one trained into ``weights_dir`` (``train_vlm --out``)."""
    from vprune.testbed import vlm as V

    return V.load_vlm(device=device, **_paths(weights_dir))


def model_depth_and_k(weights_dir: Optional[str] = None) -> tuple:
    """(decoder layers, the config's ``prune_layer``) of the model ``load`` returns."""
    from vprune.testbed import vlm as V

    cfg = V.read_config(_paths(weights_dir)["config"])
    return cfg["text"]["num_hidden_layers"], cfg.get("prune_layer", 2)


def evaluate_grid(keeps: Sequence[float], strategies: Sequence[str], n: int, seed: int, layer: int,
                  batch_size: int = 64, log=print, weights_dir: Optional[str] = None,
                  device: str = "cpu") -> Dict[str, Any]:
    import vprune
    from vprune.testbed import vlm as V
    from vprune.testbed.train_vlm import TEST_SEED, TRAIN_SEED, image_baselines
    from vprune.testbed.vqa import chance, make_dataset, text_prior

    model, tok = load(weights_dir, device)
    depth = model.config.text_config.num_hidden_layers
    samples = make_dataset(n, seed=TEST_SEED + seed)
    t0 = time.time()
    base_preds = V.answer(model, tok, samples, batch_size)
    base = V.accuracy(base_preds, samples)
    log(f"unpruned: {base:.4f} ({len(samples)} questions, {time.time() - t0:.1f} s)")
    cells: List[Dict[str, Any]] = []
    notes: Dict[str, str] = {}
    identical_at_full: Optional[bool] = None
    for strategy in strategies:
        for keep in keeps:
            cell: Dict[str, Any] = {"strategy": strategy, "keep": keep,
                                    "kept_tokens": max(1, min(64, int(round(keep * tok.image_seq_length))))}
            if keep >= 1.0 and strategy != "fastv":
                cell.update(accuracy=base, relative=1.0, source="unpatched")
                cells.append(cell)
                continue
            t1 = time.time()
            try:
                how = patch_for(model, strategy, float(keep), layer, seed)
            except Exception as exc:  # a strategy the integration refuses: shown, not hidden
                cell.update(accuracy=None, relative=None, error=f"{type(exc).__name__}: {exc}")
                cells.append(cell)
                log(f"{strategy:9s} keep {keep:6.3f}: unavailable ({cell['error']})")
                continue
            notes.setdefault(strategy, how)
            try:
                preds = V.answer(model, tok, samples, batch_size)
                st = vprune.stats(model)
            finally:
                vprune.unpatch(model)
            acc = V.accuracy(preds, samples)
            per: Dict[str, List[bool]] = {}
            for p, s in zip(preds, samples):
                per.setdefault(s.qtype, []).append(p == s.answer)
            after = st.get("visual_tokens_after") or []
            cell.update(accuracy=acc, relative=acc / base if base else None, source="patched",
                        kept_tokens_measured=after[0] if after else None,
                        per_type={t: float(np.mean(v)) for t, v in sorted(per.items())},
                        seconds=round(time.time() - t1, 1))
            if keep >= 1.0:
                identical_at_full = preds == base_preds
            cells.append(cell)
            log(f"{strategy:9s} keep {keep:6.3f} ({cell['kept_tokens']:2d} tokens): {acc:.4f} "
                f"({acc / base * 100:.1f}% of unpruned) [{cell['seconds']} s]")
    baselines = image_baselines(model, tok, samples, batch_size)
    prior = text_prior(make_dataset(3000, seed=TRAIN_SEED + 7), samples)
    return {"unpruned": base, "text_only_prior": prior, "chance": chance(), **baselines,
            "patched_keep_1_identical": identical_at_full, "cells": cells, "strategy_paths": notes,
            "samples": n, "layer": layer, "depth": depth, "seed": seed, "test_seed": TEST_SEED + seed,
            "visual_tokens": tok.image_seq_length}


# ------------------------------------------------------------------------------------ outputs
def table_markdown(res: Dict[str, Any], keeps: Sequence[float], strategies: Sequence[str]) -> str:
    by = {(c["strategy"], c["keep"]): c for c in res["cells"]}
    n_vis = res["visual_tokens"]
    head = "| strategy | " + " | ".join(
        f"{k * 100:g}% ({max(1, min(n_vis, int(round(k * n_vis))))})" for k in keeps) + " |"
    lines = [head, "|" + " --- |" * (len(keeps) + 1)]
    for s in strategies:
        row = []
        for k in keeps:
            c = by.get((s, k))
            if c is None or c.get("accuracy") is None:
                row.append("n/a")
            else:
                row.append(f"{c['accuracy'] * 100:.1f} ({c['relative'] * 100:.0f}%)")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Accuracy % on {res['samples']} held-out questions (in brackets: % of the unpruned "
                 f"{res['unpruned'] * 100:.1f}%); keep as % of {n_vis} visual tokens (count); pruning from "
                 f"decoder layer K={res['layer']} of {res.get('depth', 4)}. Image-free baselines: text-only prior "
                 f"{res['text_only_prior'] * 100:.1f}%, blank image {res['blank_image'] * 100:.1f}%, "
                 f"shuffled images {res['shuffled_image'] * 100:.1f}%, chance {res['chance'] * 100:.1f}%.")
    return "\n".join(lines)


_PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def plot_png(res: Dict[str, Any], keeps: Sequence[float], strategies: Sequence[str], path: str) -> None:
    """Accuracy vs keep fraction (log-spaced x), one line per strategy, PIL only."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = 760, 480
    left, right, top, bottom = 70, 190, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = sorted(set(float(k) for k in keeps))
    lx = [np.log(k) for k in xs]
    x0, x1 = min(lx), max(lx)
    if x1 == x0:
        x1 = x0 + 1

    def px(k: float) -> float:
        return left + (np.log(k) - x0) / (x1 - x0) * (w - left - right)

    def py(a: float) -> float:
        return top + (1 - a) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for a in np.linspace(0, 1, 6):
        y = py(a)
        d.line([left, y, w - right, y], fill=(225, 225, 225))
        d.text((left - 34, y - 6), f"{a * 100:.0f}%", fill="black", font=font)
    for k in xs:
        x = px(k)
        d.line([x, top, x, h - bottom], fill=(235, 235, 235))
        d.text((x - 14, h - bottom + 6), f"{k * 100:g}%", fill="black", font=font)
    d.text((left + (w - left - right) / 2 - 90, h - 24), "visual tokens kept (% of 64, log scale)", fill="black",
           font=font)
    d.text((left, 12), f"testbed VLM (tiny LLaVA), {res['samples']} questions, pruning at layer K={res['layer']}",
           fill="black", font=font)
    for name, val, colour in (("text-only prior", res["text_only_prior"], (120, 120, 120)),
                              ("unpruned", res["unpruned"], (0, 0, 0))):
        y = py(val)
        for x in range(left, w - right, 8):
            d.line([x, y, min(x + 4, w - right), y], fill=colour)
    by = {(c["strategy"], c["keep"]): c for c in res["cells"]}
    ly = top + 8
    for i, s in enumerate(strategies):
        colour = _PALETTE[i % len(_PALETTE)]
        pts = [(px(k), py(by[(s, k)]["accuracy"])) for k in xs
               if (s, k) in by and by[(s, k)].get("accuracy") is not None]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([w - right + 12, ly + 6, w - right + 36, ly + 6], fill=colour, width=2)
        d.text((w - right + 42, ly), s, fill="black", font=font)
        ly += 18
    for name, colour in (("unpruned", (0, 0, 0)), ("text-only prior", (120, 120, 120))):
        for x in range(w - right + 12, w - right + 36, 8):
            d.line([x, ly + 6, x + 4, ly + 6], fill=colour)
        d.text((w - right + 42, ly), name, fill="black", font=font)
        ly += 18
    img.save(path)


def _versions() -> Dict[str, str]:
    import transformers

    import vprune

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vprune": vprune.__version__}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", type=float, nargs="+", default=list(KEEPS),
                        help="keep fractions of the 64 visual tokens (default: 1 0.5 0.25 0.125 0.05)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--samples", type=int, default=1000, help="held-out questions (default 1000)")
    parser.add_argument("--quick", action="store_true", help="200 questions")
    parser.add_argument("--layer", type=int, default=None,
                        help="K: first decoder layer that sees only kept tokens (default: the model config's prune_layer)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="test-set offset and the random strategy's seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output prefix: writes PREFIX.json, PREFIX.md, PREFIX.png (default {DEFAULT_OUT})")
    parser.add_argument("--no-files", action="store_true", help="print the table only")
    parser.add_argument("--weights-dir", default=None,
                        help="evaluate weights trained elsewhere (a train_vlm --out folder) instead of the shipped ones")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    n = 200 if args.quick else args.samples
    keeps = sorted({float(k) for k in args.keep}, reverse=True)
    for k in keeps:
        if not 0 < k <= 1:
            print(f"--keep {k} is invalid: fractions in (0, 1]", file=sys.stderr)
            return 2
    depth, config_k = model_depth_and_k(args.weights_dir)
    layer = config_k if args.layer is None else args.layer
    if not 1 <= layer < depth:
        print(f"--layer {layer} is invalid: K must be in [1, {depth - 1}] for this {depth}-layer model", file=sys.stderr)
        return 2
    t0 = time.time()
    res = evaluate_grid(keeps, args.strategies, n, args.seed, layer, args.batch_size,
                       weights_dir=args.weights_dir, device=args.device)
    res.update(command="vprune eval vlm " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["eval", "vlm"] else sys.argv[1:]),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), versions=_versions(), device=args.device,
               threads=args.threads, seconds=round(time.time() - t0, 1))
    table = table_markdown(res, keeps, args.strategies)
    print()
    print(table)
    for s, how in res["strategy_paths"].items():
        if how != "integration":
            print(f"{s}: {how}")
    if not args.no_files:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
        with open(args.out + ".md", "w") as f:
            f.write(f"<!-- {res['command']} | {res['date']} | {res['versions']} -->\n" + table + "\n")
        plot_png(res, keeps, args.strategies, args.out + ".png")
        print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png")
    return 0
