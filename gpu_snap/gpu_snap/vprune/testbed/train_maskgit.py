"""Train the testbed MaskGIT and its metric classifier (seeded, CPU, one thread).

    python -m vprune.testbed.train_maskgit [--iters 1200] [--out vprune/testbed/maskgit_testbed.safetensors]

Reproducible: fixed seeds, ``torch.set_num_threads(1)``, fixed iteration counts (a few minutes on
one core). Data: synthetic shapes (``maskgit.make_dataset``), tokenized with the fixed glyph
codebook. MaskGIT objective: mask ``ceil(N * cos(pi/2 * r))`` tokens, ``r ~ U(0, 1)``, cross-entropy
on the masked positions; 10% of labels dropped to the "no class" id (classifier-free guidance);
half of the batches use ENAT's attention pattern (visible tokens attend only to visible tokens of
the same or an earlier random reveal group, masks attend to everything).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from vprune.testbed import maskgit as mg


def enat_mask(is_mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random ENAT pattern ``[B, 1, N, N]``: random reveal groups for the visible tokens."""
    b, n = is_mask.shape
    groups = torch.randint(1, 9, (b, 1), generator=gen)
    rev = (torch.rand(b, n, generator=gen) * groups).floor()          # group id, 0 = earliest
    rev = -rev                                                         # larger = earlier, as in nat
    vis = ~is_mask
    allowed = vis[:, None, :] & (rev[:, None, :] >= rev[:, :, None])
    allowed = allowed | is_mask[:, :, None]
    return allowed[:, None]


def train_classifier(tokens: torch.Tensor, labels: torch.Tensor, iters: int, seed: int) -> mg.TokenClassifier:
    torch.manual_seed(seed)
    clf = mg.TokenClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for it in range(iters):
        idx = torch.randint(0, tokens.shape[0], (256,), generator=gen)
        loss = F.cross_entropy(clf(tokens[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=mg.WEIGHTS)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.time()
    images, labels = mg.make_dataset(args.n_train, seed=args.seed + 1)
    tokens = torch.from_numpy(mg.encode(images))
    labels_t = torch.from_numpy(labels)
    print(f"data: {tokens.shape[0]} images in {time.time() - t0:.1f}s", flush=True)

    clf = train_classifier(tokens, labels_t, iters=600, seed=args.seed + 2)
    vimg, vlab = mg.make_dataset(1000, seed=args.seed + 3)
    with torch.no_grad():
        vacc = (clf(torch.from_numpy(mg.encode(vimg))).argmax(-1).numpy() == vlab).mean()
    print(f"classifier: val acc {vacc:.3f} ({time.time() - t0:.0f}s)", flush=True)

    cfg = mg.MaskGITConfig()
    model = mg.TinyMaskGIT(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warm = max(1, args.iters // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, args.iters) / args.iters)))
    gen = torch.Generator().manual_seed(args.seed + 4)
    n = cfg.n_tokens
    model.train()
    ema = None
    for it in range(args.iters):
        idx = torch.randint(0, tokens.shape[0], (args.batch,), generator=gen)
        x0, y = tokens[idx], labels_t[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        y[drop] = cfg.num_classes
        r = torch.rand(args.batch, 1, generator=gen)
        n_mask = torch.ceil(torch.cos(math.pi / 2 * r) * n).clamp(1, n)
        order = torch.rand(args.batch, n, generator=gen).argsort(1).argsort(1)
        is_mask = order < n_mask
        x = torch.where(is_mask, torch.full_like(x0, model.mask_id), x0)
        attn_mask = enat_mask(is_mask, gen) if it % 2 == 1 else None
        logits = model(x, y, attn_mask=attn_mask)
        loss = F.cross_entropy(logits[is_mask], x0[is_mask], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if it % 100 == 0 or it == args.iters - 1:
            print(f"it {it} loss {ema:.3f} lr {sched.get_last_lr()[0]:.2e} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()

    from safetensors.torch import save_file
    sd = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    sd.update({f"clf.{k}": v.detach().contiguous() for k, v in clf.state_dict().items()})
    save_file(sd, args.out, metadata={"config": mg.config_json(cfg), "iters": str(args.iters),
                                      "seed": str(args.seed), "classifier_val_acc": f"{vacc:.4f}"})
    print(f"saved {args.out} ({time.time() - t0:.0f}s)", flush=True)

    metric = mg.QualityMetric(clf)
    lab = torch.arange(200) % cfg.num_classes
    for g in (1.0, 2.0):
        toks = mg.sample(model, lab, steps=12, guidance=g, seed=0)
        print(f"guidance {g}: {metric(toks, lab)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
