"""Does the last prompt row's attention find the object a question asks about? (testbed VLM)

    python -m vprune.evaluation.vlm_probe [--layer 1] [--keep 16] [--questions 40]

For "what color is the <shape> ?" questions of the testbed VQA task, runs the unpatched testbed VLM
with eager attention and reports, at decoder layer ``--layer`` (FastV scores at K-1): the share of
the asked object's patches that FastV's top-``keep`` visual tokens cover, the same for a random
choice of ``keep`` tokens, and the head-mean attention mass on the object against its share of the
visual tokens. This explains the FastV column of ``vprune eval vlm`` (an analysis tool, not part of
pruning: it uses ``output_attentions``).
"""
from __future__ import annotations

import argparse
from typing import Dict

import numpy as np
import torch


def probe(layer: int = 1, keep: int = 16, questions: int = 40, seed: int = 0) -> Dict[str, float]:
    from vprune.testbed import vlm as V
    from vprune.testbed.train_vlm import TEST_SEED, patch_labels
    from vprune.testbed.vqa import COLORS, SHAPES, make_dataset

    model, tok = V.load_vlm(attn="eager")
    cfg = V.read_config()
    side = cfg["image_size"] // cfg["patch_size"]
    samples = [s for s in make_dataset(40 * questions, seed=TEST_SEED + seed) if s.qtype == "color"][:questions]
    rng = np.random.default_rng(seed)
    top_cover, rand_cover, mass, share = [], [], [], []
    for s in samples:
        batch = V.collate([s], tok)
        with torch.no_grad():
            att = model(**batch, output_attentions=True).attentions[layer][0].float().mean(0)[-1]
        visual = (batch["input_ids"][0] == tok.image_token_id).nonzero().flatten()
        row = att[visual]
        shape = s.question.split()[4]
        obj = next(o for o in s.objects if o.shape == shape)
        cls = 1 + list(COLORS).index(obj.color) * len(SHAPES) + list(SHAPES).index(obj.shape)
        patches = set(np.nonzero(patch_labels(s.objects, cfg["image_size"], cfg["patch_size"]) == cls)[0].tolist())
        top = set(row.topk(keep).indices.tolist())
        rand = set(rng.choice(side * side, keep, replace=False).tolist())
        top_cover.append(len(patches & top) / len(patches))
        rand_cover.append(len(patches & rand) / len(patches))
        mass.append(float(row[sorted(patches)].sum() / row.sum()))
        share.append(len(patches) / (side * side))
    return {"questions": len(samples), "layer": layer, "keep": keep,
            "fastv_top_covers_object": float(np.mean(top_cover)), "random_covers_object": float(np.mean(rand_cover)),
            "attention_mass_on_object": float(np.mean(mass)), "object_share_of_tokens": float(np.mean(share))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=1, help="decoder layer whose attention is read (K-1)")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--questions", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for k, v in probe(args.layer, args.keep, args.questions).items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
