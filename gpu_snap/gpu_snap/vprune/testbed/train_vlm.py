"""Train the testbed VLM (``vprune.testbed.vlm``) on the synthetic VQA task, reproducibly.

    python -m vprune.testbed.train_vlm --out DIR             # writes vlm.safetensors, vlm_config.json,
                                                              # vlm_tokenizer.json, vlm_train.json
    python -m vprune.testbed.train_vlm --steps 200 --out /tmp/vlm   # a quick try on the CPU

The shipped files come from one GPU run (``vlm_train.json`` records the command, accuracy, log and
timings; about 6.5 minutes on an H100 machine, bound by rendering scenes in 5 worker processes):

    python -m vprune.testbed.train_vlm --device cuda --workers 5 --batch 128 --lr 2e-3 --steps 5000 \
        --val 256 --test 1000 --prior-train 3000 --out vprune/testbed

It answers 82.1% of 1000 held-out questions (text-only prior 35.0%, blank image 37.6%): colour,
shape and the three counting types at 100%, top/bottom at 94%, while left/right and the two
relations stay at chance. A model with twice the width, or twice the width and 8 layers, trained the
same way ended at the same place (81.3%, 81.8%). The earlier CPU budget (800 steps of 32
questions) gave 57.8%.

Seeded (torch, numpy and the data stream), single-threaded by default (``--threads 1``), fp32,
AdamW with linear warm-up and cosine decay, cross-entropy on the answer token only (the logits of
the last prompt position, ``logits_to_keep=1``), plus an auxiliary dense loss that speeds up
learning on a CPU budget: a linear probe on the projector output (the LM's visual token embeddings)
predicts, for each of the 64 patches, the colour and shape of the object covering it (or
background), optionally a second one its row and column (``--aux-weight``, ``--pos-weight``). The
probes are discarded: the shipped model is a plain ``LlavaForConditionalGeneration``.
Batch i is drawn from ``VQAGenerator([stream seed, i])`` (``make_batch``), so the data are the same
for any ``--workers`` and the model never sees a test scene (test seeds differ from the training
seed). Bit-for-bit reproducibility holds for the same torch build, device and thread count.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch

from . import vlm as V
from .vqa import COLORS, QTYPES, SHAPES, VQAGenerator, chance, make_dataset, text_prior

TRAIN_SEED = 1234
TEST_SEED = 987654  # also the seed `vprune eval vlm` uses by default


def _versions() -> Dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def evaluate(model, tok, samples, batch_size: int = 64) -> Dict[str, Any]:
    """Accuracy overall and per question type (greedy one-token generate)."""
    preds = V.answer(model, tok, samples, batch_size=batch_size)
    per: Dict[str, List[bool]] = {}
    for p, s in zip(preds, samples):
        per.setdefault(s.qtype, []).append(p == s.answer)
    return {"accuracy": V.accuracy(preds, samples),
            "per_type": {t: float(np.mean(v)) for t, v in sorted(per.items())}}


def image_baselines(model, tok, samples, batch_size: int = 64) -> Dict[str, float]:
    """The trained model with the image taken away: a blank (background-grey) image, and each
    question paired with another sample's image (shuffled). Both should fall to about chance."""
    from .vqa import BACKGROUND

    blank = np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), samples[0].image.shape).copy()
    blank_preds = V.answer(model, tok, samples, batch_size, images=[blank] * len(samples))
    perm = np.random.default_rng(0).permutation(len(samples))
    shuffled = [samples[int(i)].image for i in perm]
    shuf_preds = V.answer(model, tok, samples, batch_size, images=shuffled)
    return {"blank_image": V.accuracy(blank_preds, samples), "shuffled_image": V.accuracy(shuf_preds, samples)}


def patch_labels(objects, image_size: int, patch: int) -> np.ndarray:
    """int64 [P*P]: 0 for background, else 1 + colour * 3 + shape of the object whose box holds the
    patch centre (the auxiliary probe's targets)."""
    n = image_size // patch
    out = np.zeros(n * n, dtype=np.int64)
    colours, shapes = list(COLORS), list(SHAPES)
    for o in objects:
        x0, y0 = o.x - o.size // 2, o.y - o.size // 2
        for r in range(n):
            for c in range(n):
                cx, cy = c * patch + patch / 2, r * patch + patch / 2
                if x0 <= cx < x0 + o.size and y0 <= cy < y0 + o.size:
                    out[r * n + c] = 1 + colours.index(o.color) * len(shapes) + shapes.index(o.shape)
    return out


def make_batch(job) -> tuple:
    """Batch ``index`` of the training stream: (samples, patch labels [B, P*P]), reproducible from
    (stream seed, index) alone, so any number of worker processes gives the same data."""
    stream_seed, index, batch, image_size, patch = job
    gen = VQAGenerator(seed=[stream_seed, index])
    samples = [gen.sample() for _ in range(batch)]
    labels = np.stack([patch_labels(s.objects, image_size, patch) for s in samples])
    return samples, labels


def batches(stream_seed: int, steps: int, batch: int, image_size: int, patch: int, workers: int):
    """The training batches in order, rendered by ``workers`` processes (0: in this process)."""
    jobs = ((stream_seed, i, batch, image_size, patch) for i in range(steps))
    if workers <= 0:
        yield from map(make_batch, jobs)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:  # spawn: safe next to an initialised CUDA context
        yield from pool.imap(make_batch, jobs, chunksize=4)


def model_config(args: argparse.Namespace, vocab_size: int) -> Dict[str, Any]:
    """The testbed schema (``V.DEFAULT_CONFIG``) with the size options applied."""
    cfg = copy.deepcopy(V.DEFAULT_CONFIG)
    t, v = cfg["text"], cfg["vision"]
    if args.hidden:
        t["hidden_size"], t["intermediate_size"] = args.hidden, 2 * args.hidden
    if args.text_layers:
        t["num_hidden_layers"] = args.text_layers
    if args.vision_hidden:
        v["hidden_size"], v["intermediate_size"] = args.vision_hidden, 2 * args.vision_hidden
    if args.vision_layers:
        v["num_hidden_layers"] = args.vision_layers
    if args.prune_layer is not None:
        if not 1 <= args.prune_layer < t["num_hidden_layers"]:
            raise SystemExit(f"--prune-layer {args.prune_layer}: must be in [1, {t['num_hidden_layers'] - 1}]")
        cfg["prune_layer"] = args.prune_layer
    cfg["vocab_size"] = vocab_size
    return cfg


def train(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    base = V.DEFAULT_CONFIG
    tok = V.VLMTokenizer(V.build_vocab(), image_seq_length=(base["image_size"] // base["patch_size"]) ** 2)
    cfg = model_config(args, len(tok))
    model = V.build_vlm(cfg, seed=args.seed).train()
    previous = None
    if args.init:  # continue from an earlier run's weights (a fresh optimiser and schedule)
        from safetensors.torch import load_file

        V.load_state_dict_any_layout(model, load_file(os.path.join(args.init, "vlm.safetensors")))
        with open(os.path.join(args.init, "vlm_train.json")) as f:
            prev = json.load(f)
        previous = {k: prev.get(k) for k in ("command", "steps", "batch", "lr", "seed", "train_seconds",
                                             "train_cpu_seconds", "accuracy", "previous")}
        print(f"continuing from {args.init} (accuracy {prev.get('accuracy')})", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_side = cfg["image_size"] // cfg["patch_size"]
    model.to(device)
    probe = torch.nn.Linear(cfg["text"]["hidden_size"], 1 + len(COLORS) * len(SHAPES)).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2] + list(probe.parameters())
    if args.pos_weight > 0:
        pos_probe = torch.nn.Linear(cfg["text"]["hidden_size"], 2 * n_side).to(device)  # row and column of each patch
        decay += list(pos_probe.parameters())
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    stream_seed = TRAIN_SEED + args.seed + (1000 if args.init else 0)
    captured: Dict[str, torch.Tensor] = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.__setitem__("v", out))
    val = make_dataset(args.val, seed=TEST_SEED + 1)
    print(f"testbed VLM: {n_params / 1e6:.2f} M params, vocab {len(tok)}, {args.steps} steps x {args.batch}",
          flush=True)
    t0, c0 = time.time(), time.process_time()
    log: List[Dict[str, Any]] = []
    running = None
    stream = batches(stream_seed, args.steps, args.batch, cfg["image_size"], cfg["patch_size"], args.workers)
    for step, (samples, patch_targets) in enumerate(stream):
        batch = V.collate(samples, tok, device=str(device))
        target = torch.tensor([tok.ids[s.answer] for s in samples], device=device)
        out = model(**batch, logits_to_keep=1)
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1].float(), target)
        if args.aux_weight > 0:
            labels = torch.from_numpy(patch_targets).to(device)
            vis = captured["v"].reshape(len(samples), n_side * n_side, -1)
            loss = loss + args.aux_weight * torch.nn.functional.cross_entropy(
                probe(vis).flatten(0, 1), labels.flatten())
        if args.pos_weight > 0:
            vis = captured["v"].reshape(len(samples), n_side * n_side, -1)
            rc = pos_probe(vis)  # [B, P, 2 * side]
            grid = torch.arange(n_side * n_side, device=device)
            rows, cols = (grid // n_side).repeat(len(samples)), (grid % n_side).repeat(len(samples))
            loss = loss + args.pos_weight * 0.5 * (
                torch.nn.functional.cross_entropy(rc[..., :n_side].flatten(0, 1), rows)
                + torch.nn.functional.cross_entropy(rc[..., n_side:].flatten(0, 1), cols))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            entry = {"step": step + 1, "loss": round(running, 4), "elapsed_s": round(time.time() - t0, 1)}
            if (step + 1) % (args.log_every * 5) == 0 or step + 1 == args.steps:
                model.eval()
                entry["val_accuracy"] = round(evaluate(model, tok, val)["accuracy"], 4)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_s, train_cpu = time.time() - t0, time.process_time() - c0
    model.eval().cpu()

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "vlm.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "vlm_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    tok.save(os.path.join(args.out, "vlm_tokenizer.json"))

    # held-out evaluation of the saved weights, reloaded the way users load them
    model, tok = V.load_vlm(weights=os.path.join(args.out, "vlm.safetensors"),
                            config=os.path.join(args.out, "vlm_config.json"),
                            tokenizer=os.path.join(args.out, "vlm_tokenizer.json"), device=str(device))
    test = make_dataset(args.test, seed=TEST_SEED)
    result = evaluate(model, tok, test)
    baselines = image_baselines(model, tok, test)
    prior = text_prior(make_dataset(args.prior_train, seed=TRAIN_SEED + 7), test)
    report = {
        "test_samples": args.test, "test_seed": TEST_SEED,
        "accuracy": result["accuracy"], "per_type": result["per_type"],
        "text_only_prior": prior, "chance": chance(QTYPES), **baselines,
        "params": n_params, "config": cfg, "device": str(device), "workers": args.workers,
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "aux_weight": args.aux_weight, "pos_weight": args.pos_weight,
        "threads": args.threads, "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
        "previous": previous, "versions": _versions(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "vprune.testbed.train_vlm"] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "log": log,
    }
    with open(os.path.join(args.out, "vlm_train.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(json.dumps({k: report[k] for k in ("accuracy", "per_type", "text_only_prior", "chance", "blank_image",
                                             "shuffled_image", "train_seconds", "train_cpu_seconds")}, indent=1), flush=True)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the auxiliary per-patch colour/shape probe loss (0: answer loss only)")
    p.add_argument("--pos-weight", type=float, default=0.0,
                   help="weight of an auxiliary per-patch row/column probe loss (default off: it did not help)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (scenes are rendered on the CPU)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes rendering training batches (0: the training process; same data either way)")
    p.add_argument("--hidden", type=int, default=0, help="LM hidden size (MLP 2x; default: the schema's 64)")
    p.add_argument("--text-layers", type=int, default=0, help="LM decoder layers (default: the schema's 4)")
    p.add_argument("--vision-hidden", type=int, default=0, help="vision tower width (default: the schema's 64)")
    p.add_argument("--vision-layers", type=int, default=0, help="vision tower layers (default: the schema's 2)")
    p.add_argument("--prune-layer", type=int, default=None,
                   help="K recorded in the config: the first decoder layer that sees only kept tokens")
    p.add_argument("--val", type=int, default=256, help="validation samples checked during training")
    p.add_argument("--test", type=int, default=1000, help="held-out test samples checked at the end")
    p.add_argument("--prior-train", type=int, default=5000, help="samples the text-only prior is fitted on")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", default=V.HERE)
    p.add_argument("--init", default=None,
                   help="continue training from the files of an earlier run (a folder with vlm.safetensors and vlm_train.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
