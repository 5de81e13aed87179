"""Exact-match accuracy of the shipped testbed DLM: vanilla vs Window-Diffusion (several settings) vs window + parallel decoding.

    vprune eval dlm [--n 32] [--batch 16] [--json out.json]

The testbed (``vprune.testbed.dlm``) writes arithmetic progressions of 64-224 tokens into a
256-token answer; every answer is checked exactly. Prompts in a batch have different lengths and are
left-padded. Reports exact-match accuracy, accuracy relative to vanilla, token accuracy, the
fraction of answer tokens equal to the vanilla sampler's, decoded tokens per step, model
forwards' computed tokens relative to vanilla, and wall time (CPU).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List, Optional

import torch

from vprune.config import WindowDiffusion

SETTINGS = [
    ("vanilla", None, None),
    ("window 16/64/32 (default)", WindowDiffusion(), None),
    ("window 8/32/16", WindowDiffusion(active=8, window=32, refresh=16), None),
    ("window 32/128/32", WindowDiffusion(active=32, window=128, refresh=32), None),
    ("window 16/64/64", WindowDiffusion(active=16, window=64, refresh=64), None),
    ("vanilla + parallel 0.9", None, 0.9),
    ("window + parallel 0.9", WindowDiffusion(threshold=0.9), None),
    ("window + parallel 0.7", WindowDiffusion(threshold=0.7), None),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=32, help="problems (default 32)")
    p.add_argument("--batch", type=int, default=16, help="batch size (left-padded prompts)")
    p.add_argument("--seed", type=int, default=1234, help="problem seed (training used other draws)")
    p.add_argument("--block-length", type=int, default=None, help="LLaDA block length (default: the whole answer)")
    p.add_argument("--only", default=None, help="comma-separated setting indices to run (default all)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def evaluate(n: int = 32, batch: int = 16, seed: int = 1234, block_length: Optional[int] = None,
             only: Optional[List[int]] = None, log=print, device: str = "cpu") -> List[Dict[str, Any]]:
    from vprune.integrations.llada import diffusion_generate
    from vprune.testbed import dlm

    model = dlm.load_testbed_dlm(device)
    problems = dlm.make_problems(n, seed)
    g = dlm.GEN_LENGTH
    rows: List[Dict[str, Any]] = []
    base_acc = base_tok = None
    vanilla_out: Dict[int, torch.Tensor] = {}
    for idx, (name, cfg, thr) in enumerate(SETTINGS):
        if only is not None and idx not in only and idx != 0:
            continue
        ok: List[bool] = []
        tok_ok = tok_n = agree = 0
        steps = computed = 0
        t0 = time.time()
        for s in range(0, n, batch):
            ps = problems[s:s + batch]
            ids, am = dlm.left_pad([p.prompt_ids() for p in ps])
            ids, am = ids.to(device), am.to(device)
            st: Dict[str, Any] = {}
            out = diffusion_generate(model, ids, am, config=cfg, gen_length=g, steps=g, block_length=block_length,
                                     threshold=thr, stats=st)
            out = out.cpu()
            ok += dlm.exact_match(out[:, -g:], ps)
            tgt = torch.tensor([p.target(g) for p in ps])
            tok_ok += int((out[:, -g:] == tgt).sum())
            tok_n += tgt.numel()
            if idx == 0:
                vanilla_out[s] = out[:, -g:]
            agree += int((out[:, -g:] == vanilla_out[s]).sum())
            steps += st["steps"]
            computed += st["computed_tokens"]
        acc = sum(ok) / len(ok)
        if base_acc is None:
            base_acc, base_tok = acc, computed
        n_batches = -(-n // batch)
        row = dict(setting=name, config=None if cfg is None else cfg.to_dict(), threshold=thr, accuracy=acc,
                   relative_accuracy=acc / base_acc if base_acc else float("nan"),
                   token_accuracy=tok_ok / tok_n, token_agreement_with_vanilla=agree / tok_n,
                   tokens_per_step=g * n_batches / steps, computed_tokens_rel=computed / base_tok,
                   seconds=time.time() - t0)
        rows.append(row)
        log(f"{name:28s} acc {acc:6.1%}  rel {row['relative_accuracy']:6.1%}  token acc {row['token_accuracy']:6.1%}"
            f"  same as vanilla {row['token_agreement_with_vanilla']:6.1%}  tok/step {row['tokens_per_step']:5.2f}"
            f"  computed {row['computed_tokens_rel']:6.1%}  {row['seconds']:6.1f}s")
    return rows


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    only = None if args.only is None else [int(x) for x in args.only.split(",")]
    print(f"testbed DLM, {args.n} problems, batch {args.batch}, gen 256, one token per step unless parallel")
    rows = evaluate(args.n, args.batch, args.seed, args.block_length, only, device=args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(n=args.n, batch=args.batch, seed=args.seed, block_length=args.block_length,
                           torch=torch.__version__, results=rows), f, indent=1)
    return 0
