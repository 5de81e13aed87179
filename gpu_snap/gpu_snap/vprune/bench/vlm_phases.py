"""Where a LLaVA-7B-shaped prefill's wall time goes, phase by phase, eager vs inside a CUDA graph.

    python3 -m vprune.bench.vlm_phases [--batch 8] [--keep 64] [--layer 2]     # GPU; about 1 min

Builds the ``vprune bench vlm`` model (random bf16 weights) and times three phases of the ideal pruned
prefill separately, each as plain eager calls (host-synchronised wall time, median of 20) and as the
replay of the same call captured in a CUDA graph (the time the GPU needs once launch overhead is gone):

* vision: vision tower (hidden states up to the feature layer) + projector on the batch's images;
* LM 0..K-1: the first K decoder layers over all prompt tokens (64 text + 576 visual);
* LM K..: the remaining decoder layers + final norm over 64 text + ``keep`` visual tokens.

A phase whose eager time is well above its graph time is bound by the host launching kernels, not by
the GPU. No pruning code runs here: this measures the model, to say what bounds a pruned prefill.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict

import torch

from vprune.bench.vlm import LLAVA_7B, build_llava, llava_image_embeds, llava_inputs, text_model_of


def _wall_ms(fn: Callable[[], Any], runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _graph_ms(fn: Callable[[], Any], runs: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _wall_ms(graph.replay, runs)


def _layers_fn(text_model: Any, start: int, stop: int, hidden: torch.Tensor, pos: torch.Tensor,
               final_norm: bool) -> Callable[[], torch.Tensor]:
    rope = text_model.rotary_emb
    layers = list(text_model.layers)[start:stop]

    def run() -> torch.Tensor:
        h = hidden
        cos_sin = rope(h, pos)
        for layer in layers:
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        return text_model.norm(h) if final_norm else h
    return run


@torch.no_grad()
def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--text-len", type=int, default=64)
    args = p.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    model, n_img = build_llava(LLAVA_7B, dev, dtype)
    inputs = llava_inputs(LLAVA_7B, args.batch, args.text_len, dev, dtype)
    text_model = text_model_of(model)
    d = model.config.text_config.hidden_size
    full = args.text_len + n_img
    short = args.text_len + args.keep
    g = torch.Generator(device=dev).manual_seed(0)
    h_full = torch.randn(args.batch, full, d, device=dev, dtype=dtype, generator=g)
    h_short = torch.randn(args.batch, short, d, device=dev, dtype=dtype, generator=g)
    pos_full = torch.arange(full, device=dev).unsqueeze(0).expand(args.batch, -1)
    pos_short = torch.arange(short, device=dev).unsqueeze(0).expand(args.batch, -1)
    depth = len(text_model.layers)
    phases: Dict[str, Callable[[], Any]] = {
        "vision": lambda: llava_image_embeds(model, inputs["pixel_values"]),
        f"LM 0..{args.layer - 1} ({full} tokens)": _layers_fn(text_model, 0, args.layer, h_full, pos_full, False),
        f"LM {args.layer}..{depth - 1} ({short} tokens)": _layers_fn(text_model, args.layer, depth, h_short,
                                                                        pos_short, True),
    }
    print(f"LLaVA-1.5-7B-shaped, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"batch {args.batch}, keep {args.keep}/{n_img}, K={args.layer}")
    print("| phase | eager wall ms | CUDA-graph replay ms | eager / graph |")
    print("| --- | --- | --- | --- |")
    tot_e = tot_g = 0.0
    for name, fn in phases.items():
        for _ in range(3):
            fn()
        eager, graph = _wall_ms(fn), _graph_ms(fn)
        tot_e += eager
        tot_g += graph
        print(f"| {name} | {eager:.2f} | {graph:.2f} | {eager / graph:.2f} |", flush=True)
    print(f"| sum | {tot_e:.2f} | {tot_g:.2f} | {tot_e / tot_g:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
