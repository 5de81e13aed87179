"""Tokens per second and speedup of Window-Diffusion vs the vanilla sampler on a LLaDA-8B-shaped model.

    vprune bench dlm [--quick | --tiny] [--gens 256,1024] [--batches 1,8] [--json out.json]

Builds a LLaDA-8B-shaped model (the testbed's LLaDA layout: d_model 4096, 32 layers, 32 heads,
MLP 12288, vocab 126464) with random bf16 weights on the GPU, prompt 128 tokens, one token per step
(steps = gen_length, a single block), greedy. For each (gen_length, batch):

* vanilla: a full forward per step. Every vanilla step has the same shapes and work, so only
  ``--vanilla-steps`` steps are timed and the total is extrapolated (steps x mean step time); the
  JSON says so.
* window eager: the whole generation, cheap steps in eager PyTorch.
* window CUDA graph: the whole generation with the cheap steps replayed from CUDA graphs; the first
  call (which captures the graphs) is reported separately from the timed second call.

Random weights say nothing about quality; the testbed (``vprune eval dlm``) measures that, and the
decoded tokens per step of parallel decoding (with random weights confidences stay low, so parallel
decoding is not timed here). ``--tiny`` runs a small shape on the CPU (smoke test);
``--quick`` runs gen 256 only, batch 1 and 8.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from typing import Any, Dict, List

import torch

from vprune.config import WindowDiffusion

LLADA_8B = dict(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                max_sequence_length=4096, mask_token_id=126336)
TINY = dict(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=128, vocab_size=512,
            max_sequence_length=512, mask_token_id=511)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="gen 256 only (batches 1 and 8)")
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU (smoke test, no GPU needed)")
    p.add_argument("--gens", default=None, help="comma-separated generation lengths (default 256,1024)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--vanilla-steps", type=int, default=12, help="vanilla steps timed per setting (extrapolated)")
    p.add_argument("--active", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--refresh", type=int, default=32)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph runs")
    p.add_argument("--no-eager", action="store_true", help="skip the eager window runs (launch-bound, slow at gen 1024)")
    p.add_argument("--parallel-tps", type=float, default=0.0,
                   help="also time window + parallel decoding as a fixed schedule of this many tokens per step "
                        "(the tokens/step measured on the testbed by `vprune eval dlm`; random weights never pass "
                        "a confidence threshold, so the schedule stands in for it). 0: skip")
    p.add_argument("--json", default="bench_dlm.json", help="output JSON (default bench_dlm.json)")


def build_model(shape: Dict[str, Any], device: str, dtype: torch.dtype, seed: int = 0):
    """A LLaDA-structured model with random weights, allocated directly on ``device``."""
    from vprune.testbed.dlm import LLaDAModelLM, ModelConfig

    cfg = ModelConfig(**shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # allocate (and default-init) directly on the device
            model = LLaDAModelLM(cfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev: str) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from vprune.integrations.llada import diffusion_generate

    if args.tiny:
        dev, dtype, shape = "cpu", torch.float32, TINY
        gens = [int(x) for x in (args.gens or "32,64").split(",")]
        if args.prompt == 128:
            args.prompt = 16
    else:
        if not torch.cuda.is_available():
            print("vprune bench dlm needs a CUDA GPU for the LLaDA-8B-shaped model "
                  "(torch.cuda.is_available() is False); use --tiny for a CPU smoke test", file=sys.stderr)
            return 2
        dev, dtype, shape = "cuda", torch.bfloat16, LLADA_8B
        gens = [int(x) for x in (args.gens or ("256" if args.quick else "256,1024")).split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    use_graph = dev == "cuda" and not args.no_graph
    t_build = time.perf_counter()
    model = build_model(shape, dev, dtype)
    print(f"model {shape} on {dev} {dtype}: built in {time.perf_counter() - t_build:.1f}s", flush=True)
    vocab = shape["vocab_size"]
    mask_id = shape["mask_token_id"]
    cfg = WindowDiffusion(active=args.active, window=args.window, refresh=args.refresh)
    gen_rng = torch.Generator(device="cpu").manual_seed(0)

    # warm-up (kernels, cuBLAS handles, allocator)
    ids = torch.randint(0, vocab - 1, (1, args.prompt), generator=gen_rng).to(dev)
    diffusion_generate(model, ids, gen_length=64, steps=4, block_length=64, mask_id=mask_id)
    diffusion_generate(model, ids, config=cfg, gen_length=64, steps=64, mask_id=mask_id)

    results: List[Dict[str, Any]] = []
    for gen in gens:
        for b in batches:
            ids = torch.randint(0, vocab - 1, (b, args.prompt), generator=gen_rng).to(dev)
            row: Dict[str, Any] = dict(gen_length=gen, batch=b, prompt=args.prompt, steps=gen)
            # vanilla: time a few steps of the same shapes, extrapolate
            vs = min(args.vanilla_steps, gen)
            x_len = args.prompt + gen

            @torch.no_grad()
            def vanilla_steps():
                # full forwards over the whole prompt + gen_length sequence, one per step
                from vprune.integrations.llada import LLaDAEngine
                from vprune import window as W
                eng = LLaDAEngine(model)
                run_ = W._setup(ids, None, gen, mask_id)
                for i in range(vs):
                    logits = eng.full_forward(run_.x, None, None, run_.pos_ids)
                    bs = args.prompt
                    W._decide(run_, logits[:, bs:x_len], torch.arange(bs, x_len, device=dev).expand(b, -1),
                              run_.masked[:, bs:x_len], 1, None, 0.0, "low_confidence", None)
            t_v = _time(vanilla_steps, dev)
            row["vanilla_s"] = t_v / vs * gen
            row["vanilla_timed_steps"] = vs
            row["vanilla_step_ms"] = t_v / vs * 1e3
            if not args.no_eager:
                st: Dict[str, Any] = {}
                t_w = _time(lambda: diffusion_generate(model, ids, config=cfg, gen_length=gen, steps=gen,
                                                       mask_id=mask_id, stats=st), dev)
                row.update(window_eager_s=t_w, refreshes=st["refreshes"], cheap_steps=st["cheap_steps"],
                           computed_tokens_rel=st["computed_tokens"] / (b * x_len * gen))
            if use_graph:
                ws: Dict[Any, Any] = {}
                stg: Dict[str, Any] = {}
                gcfg = cfg.replace(cuda_graph=True)
                t_g1 = _time(lambda: diffusion_generate(model, ids, config=gcfg, gen_length=gen, steps=gen,
                                                        mask_id=mask_id, workspace=ws, stats=stg), dev)
                captures = stg["graph_captures"]
                t_g2 = _time(lambda: diffusion_generate(model, ids, config=gcfg, gen_length=gen, steps=gen,
                                                        mask_id=mask_id, workspace=ws), dev)
                row.update(window_graph_first_call_s=t_g1, window_graph_s=t_g2, graph_captures=captures)
                del ws
            if args.parallel_tps > 1.0:
                p_steps = max(1, int(round(gen / args.parallel_tps)))
                pcfg = cfg.replace(cuda_graph=use_graph)
                ws2: Dict[Any, Any] = {}
                stp: Dict[str, Any] = {}
                if use_graph:  # capture first, time the second call
                    diffusion_generate(model, ids, config=pcfg, gen_length=gen, steps=p_steps, mask_id=mask_id,
                                       workspace=ws2)
                t_p = _time(lambda: diffusion_generate(model, ids, config=pcfg, gen_length=gen, steps=p_steps,
                                                       mask_id=mask_id, workspace=ws2, stats=stp), dev)
                row.update(window_parallel_s=t_p, parallel_steps=p_steps, parallel_refreshes=stp["refreshes"],
                           parallel_tokens_per_step=gen / p_steps)
                del ws2
            for k in ("window_eager_s", "window_graph_s", "window_parallel_s"):
                if k in row:
                    row[k.replace("_s", "_speedup")] = row["vanilla_s"] / row[k]
                    row[k.replace("_s", "_tok_per_s")] = b * gen / row[k]
            row["vanilla_tok_per_s"] = b * gen / row["vanilla_s"]
            results.append(row)
            msg = (f"gen {gen:5d} B {b}: vanilla {row['vanilla_s']:7.2f}s (extrap. from {vs} steps, "
                   f"{row['vanilla_step_ms']:.1f} ms/step)")
            if "window_eager_s" in row:
                msg += f"  window eager {row['window_eager_s']:7.2f}s x{row['window_eager_speedup']:.2f}"
            if use_graph:
                msg += f"  window graph {row['window_graph_s']:7.2f}s x{row['window_graph_speedup']:.2f}"
            if "window_parallel_s" in row:
                msg += f"  window+parallel {row['window_parallel_s']:7.2f}s x{row['window_parallel_speedup']:.2f}"
            print(msg, flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()

    card = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
    out = dict(
        benchmark="vprune bench dlm", command=" ".join(sys.argv), card=card,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        versions=dict(torch=torch.__version__, python=platform.python_version(),
                      cuda=torch.version.cuda),
        model_shape=shape, dtype=str(dtype), config=cfg.to_dict(),
        notes=("random weights; greedy; one token per step (steps = gen_length, one block); vanilla totals "
               "extrapolated from vanilla_timed_steps identical-shape steps; window runs are complete "
               "generations; window_graph_s is the second call (graphs already captured), "
               "window_graph_first_call_s includes capture; window_parallel_s (if present) is the window sampler "
               "(CUDA graphs when available) with a fixed schedule of parallel_tokens_per_step tokens per step, "
               "standing in for threshold decoding at the tokens/step measured on the testbed"),
        results=results)
    print()
    print(f"{'gen':>5} {'B':>2} {'vanilla tok/s':>14} {'eager tok/s':>12} {'eager x':>8}"
          + (f" {'graph tok/s':>12} {'graph x':>8}" if use_graph else ""))
    for r in results:
        eager = ((f"{r['window_eager_tok_per_s']:12.1f} {r['window_eager_speedup']:8.2f}")
                 if "window_eager_s" in r else f"{'-':>12} {'-':>8}")
        line = f"{r['gen_length']:5d} {r['batch']:2d} {r['vanilla_tok_per_s']:14.1f} " + eager
        if use_graph:
            line += f" {r['window_graph_tok_per_s']:12.1f} {r['window_graph_speedup']:8.2f}"
        if "window_parallel_s" in r:
            line += f"  +parallel ({r['parallel_tokens_per_step']:.2f} tok/step) x{r['window_parallel_speedup']:.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0
