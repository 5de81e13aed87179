"""Train the tiny LLaDA-structured testbed DLM (``vprune/testbed/dlm_testbed.safetensors``).

    python -m vprune.testbed.train_dlm [--steps N] [--seed S] [--out DIR]

The shipped weights (d_model 192, 4 layers, 6 heads, MLP 512; 7 MB) come from one seeded run on
an H100 (134 s; results/dlm_testbed_train_h100_2026-11-27.log):

    python -m vprune.testbed.train_dlm --device cuda --d-model 192 --layers 4 --heads 6 --mlp 512 \
        --batch 64 --steps 5000 --lr 2e-3 --seed 0 --max-step 1 --prefix-frac 0.6 --far-field-frac 0.5

The same command with ``--device cpu`` trains the same recipe on the CPU (hours on one thread; the
data and masks are drawn on the CPU, so only floating-point rounding differs between devices).

Masked-diffusion SFT objective (LLaDA's): per sequence a mask ratio t ~ U(eps, 1); each answer
token (answer numbers and the ``<eos>`` tail) is replaced by ``<mask>`` with probability t; the loss
is the mean cross-entropy over masked tokens (LLaDA's 1/t weighting is dropped: lower variance,
faster on this budget). The prompt is never masked. Seeded, CPU, single-threaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from vprune.testbed import dlm

ModelDefaults = dlm.ModelConfig()


def make_batch(problems, rng: random.Random, gen: torch.Generator):
    """Sequences ``prompt + target``, where the ``<eos>`` tail is cut at a random length so that
    short and full-length tails are both seen. Returns ids, attention mask, answer mask (all [B, T])."""
    seqs, plens = [], []
    for p in problems:
        prompt, ans = p.prompt_ids(), p.answer_ids()
        full = dlm.GEN_LENGTH - len(ans)
        tail = full if rng.random() < 0.15 else rng.randint(min(4, full), min(full, 24))
        seqs.append(prompt + ans + [dlm.EOS_ID] * tail)
        plens.append(len(prompt))
    t = max(len(s) for s in seqs)
    b = len(seqs)
    ids = torch.full((b, t), dlm.PAD_ID, dtype=torch.long)
    att = torch.zeros((b, t), dtype=torch.long)
    ansm = torch.zeros((b, t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        ansm[i, plens[i]:len(s)] = True
    return ids, att, ansm


def diffusion_loss(model, ids, att, ansm, gen: torch.Generator, eps: float = 1e-3, prefix_frac: float = 0.0,
                   device: torch.device = torch.device("cpu"), far_field_frac: float = 0.0):
    """Masked-diffusion loss. With probability ``prefix_frac`` a sequence is masked the way the
    samplers meet it (a revealed answer prefix, then masks; a few random masks in the prefix)
    instead of uniformly at a random ratio."""
    b, t = ids.shape
    ratio = eps + (1 - eps) * torch.rand(b, 1, generator=gen)
    masked = (torch.rand(b, t, generator=gen) < ratio) & ansm
    if prefix_frac > 0:
        start = ansm.float().argmax(1, keepdim=True)
        n_ans = ansm.sum(1, keepdim=True)
        cut = start + (torch.rand(b, 1, generator=gen) * n_ans.float()).long()
        pos = torch.arange(t)[None]
        pre = ansm & ((pos >= cut) | (torch.rand(b, t, generator=gen) < 0.1))
        use = torch.rand(b, 1, generator=gen) < prefix_frac
        masked = torch.where(use, pre, masked)
        # Window-Diffusion drops far-field masks: half of these sequences see only a window of
        # 16..128 masks after the revealed prefix (the rest neither attended nor scored), so the
        # model meets at training time the context a windowed sampler gives it.
        horizon = cut + torch.randint(16, 129, (b, 1), generator=gen)
        clip = use & (torch.rand(b, 1, generator=gen) < far_field_frac) & (pos >= horizon) & ansm
        att = att * (~clip).long()
        masked = masked & ~clip
    noisy = torch.where(masked, torch.full_like(ids, dlm.MASK_ID), ids)
    # the masks are drawn on the CPU generator so a seed gives the same data on any device
    ids, att, masked, noisy = (x.to(device) for x in (ids, att, masked, noisy))
    logits = model(noisy, attention_mask=att).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), reduction="none").view(b, t)
    return (ce * masked.float()).sum() / masked.sum().clamp(min=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=dlm.HERE)
    ap.add_argument("--max-step", type=int, default=dlm.MAX_STEP, help="progression steps drawn from 1..this")
    ap.add_argument("--init", default=None, help="start from these weights (a previous stage's safetensors)")
    ap.add_argument("--far-field-frac", type=float, default=0.0,
                    help="of the prefix-masked sequences, the fraction that sees only a window of masks")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU trains a larger model in minutes)")
    ap.add_argument("--d-model", type=int, default=ModelDefaults.d_model)
    ap.add_argument("--layers", type=int, default=ModelDefaults.n_layers)
    ap.add_argument("--heads", type=int, default=ModelDefaults.n_heads)
    ap.add_argument("--mlp", type=int, default=ModelDefaults.mlp_hidden_size)
    ap.add_argument("--prefix-frac", type=float, default=0.0,
                    help="fraction of sequences masked as a revealed prefix + masks (see diffusion_loss)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = dlm.ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, mlp_hidden_size=args.mlp)
    model = dlm.LLaDAModelLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 if "wte" in name else 1.0 / math.sqrt(p.shape[1])
                p.normal_(0.0, std)
    if args.init:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.init))
    device = torch.device(args.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    model.train()
    t0 = time.time()
    ema = None
    for step in range(args.steps):
        probs = [dlm.sample_problem(rng, max_step=args.max_step) for _ in range(args.batch)]
        ids, att, ansm = make_batch(probs, rng, gen)
        loss = diffusion_loss(model, ids, att, ansm, gen, prefix_frac=args.prefix_frac, device=device,
                              far_field_frac=args.far_field_frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % 100 == 99:
            from safetensors.torch import save_file
            os.makedirs(args.out, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      os.path.join(args.out, "dlm_testbed.ckpt.safetensors"))

    model.eval()
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "dlm_testbed.safetensors"),
              metadata={"seed": str(args.seed), "steps": str(args.steps), "task": "arithmetic progression"})
    with open(os.path.join(args.out, "dlm_testbed.json"), "w") as f:
        f.write(cfg.to_json())
    print(f"saved to {args.out} in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
