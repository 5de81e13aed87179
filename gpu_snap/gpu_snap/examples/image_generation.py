"""Generate images with and without NATCache and save them side by side.

    python examples/image_generation.py [--mode cache --refresh 4] [--n 20] [--out nat_grid.png]
    python examples/image_generation.py --amused amused/amused-256 --prompt "a red apple" [--cuda-graphs]

Default: the shipped testbed MaskGIT (no download, CPU): a grid of 32x32 shape images per class,
vanilla on the left and patched on the right, plus time per image and the quality metric
(classifier accuracy on the requested class, Frechet distance to real samples).

``--amused PATH``: a local/cached aMUSEd checkpoint through diffusers' ``AmusedPipeline`` (the
pipeline call itself is unchanged; only ``pipe.transformer`` is patched).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

import vprune


def testbed(args: argparse.Namespace) -> None:
    from vprune.testbed import maskgit as mg

    torch.set_num_threads(1)
    model, clf = mg.load_pretrained()
    metric = mg.QualityMetric(clf)
    labels = torch.arange(args.n) % mg.NUM_CLASSES

    def generate():
        t0 = time.perf_counter()
        toks = mg.sample(model, labels, steps=args.steps, guidance=args.guidance, seed=args.seed)
        return toks, (time.perf_counter() - t0) / args.n

    vanilla, t_van = generate()
    with vprune.patched(model, vprune.NATCache(mode=args.mode, refresh=args.refresh)):
        patched, t_nat = generate()
        frac = vprune.stats(model)["tokens_computed_fraction"]
    q_van, q_nat = metric(vanilla, labels), metric(patched, labels)

    def grid(toks):
        rgb = mg.to_rgb(mg.decode(toks.numpy()))                       # [n, 32, 32, 3]
        cols = mg.NUM_CLASSES
        rows = -(-len(rgb) // cols)
        pad = np.zeros((rows * cols - len(rgb),) + rgb.shape[1:], dtype=np.uint8)
        rgb = np.concatenate([rgb, pad]).reshape(rows, cols, 32, 32, 3)
        return rgb.transpose(0, 2, 1, 3, 4).reshape(rows * 32, cols * 32, 3)

    left, right = grid(vanilla), grid(patched)
    sep = np.full((left.shape[0], 8, 3), 255, dtype=np.uint8)
    img = Image.fromarray(np.concatenate([left, sep, right], 1))
    img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    img.save(args.out)
    print(f"saved {args.out} (left: vanilla, right: NATCache(mode={args.mode!r}, refresh={args.refresh}))")
    print(f"vanilla : {t_van * 1e3:7.1f} ms/image  accuracy {q_van['accuracy']:.3f}  fd {q_van['fd']:.2f}")
    print(f"patched : {t_nat * 1e3:7.1f} ms/image  accuracy {q_nat['accuracy']:.3f}  fd {q_nat['fd']:.2f}  "
          f"(computed {frac:.0%} of token-blocks)")


def amused(args: argparse.Namespace) -> None:
    from diffusers import AmusedPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = AmusedPipeline.from_pretrained(args.amused, torch_dtype=dtype).to(device)
    prompts = [args.prompt] * args.n

    def generate():
        g = torch.Generator(device).manual_seed(args.seed)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        images = pipe(prompts, num_inference_steps=args.steps, generator=g).images
        if device == "cuda":
            torch.cuda.synchronize()
        return images, (time.perf_counter() - t0) / args.n

    generate()                                   # warm-up
    vanilla, t_van = generate()
    vprune.patch(pipe.transformer, vprune.NATCache(mode=args.mode, refresh=args.refresh, cuda_graphs=args.cuda_graphs))
    if args.cuda_graphs:
        generate()                               # captures the graphs
    patched, t_nat = generate()
    vprune.unpatch(pipe.transformer)
    w, h = vanilla[0].size
    canvas = Image.new("RGB", (2 * w + 8, h * len(vanilla)), "white")
    for i, (a, b) in enumerate(zip(vanilla, patched)):
        canvas.paste(a, (0, i * h))
        canvas.paste(b, (w + 8, i * h))
    canvas.save(args.out)
    print(f"saved {args.out}; vanilla {t_van * 1e3:.1f} ms/image, NATCache {t_nat * 1e3:.1f} ms/image "
          "(aMUSEd has no shipped quality metric: compare the images)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="cache", choices=["cache", "disentangle", "reuse"])
    ap.add_argument("--refresh", type=int, default=4)
    ap.add_argument("--n", type=int, default=20, help="images per side")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="nat_grid.png")
    ap.add_argument("--amused", default=None, help="path or hub id of an aMUSEd checkpoint (already downloaded)")
    ap.add_argument("--prompt", default="a red apple on a table")
    ap.add_argument("--cuda-graphs", action="store_true")
    args = ap.parse_args()
    (amused if args.amused else testbed)(args)


if __name__ == "__main__":
    main()
