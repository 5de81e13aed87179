"""LLaVA-1.5-7B-shaped prefill and generate latency: unpatched vs vprune-patched vs the ideal (GPU).

    vprune bench vlm                    # batch 1 and 8, keep 576/192/64 of 576, K=2, bf16, SDPA, H100: ~2-3 min
    vprune bench vlm --quick            # fewer timed runs
    vprune bench vlm --tiny             # a tiny LLaVA on the CPU: checks the code path, times mean nothing

The model is a transformers ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's shapes (CLIP
ViT-L/14 at 336 px -> 576 visual tokens, feature layer -2, 2-layer GELU projector, Llama-7B LM:
32 layers, hidden 4096, 32 heads, MLP 11008, vocab 32064) and random bf16 weights created directly on
the GPU (nothing on the CPU, nothing downloaded). Prompt: 64 text tokens + 576 image tokens per row
(640), no padding.

Measured, each the median of ``--iters`` runs after ``--warmup`` runs (CUDA events):

    prefill    ``model(input_ids, attention_mask, pixel_values, logits_to_keep=1)``, vision tower included
    generate   ``model.generate(..., max_new_tokens=32, min_new_tokens=32)``, greedy, DynamicCache

for the unpatched model, the model patched with ``VisualPruning(keep=k, layer=K, strategy=fastv)``,
and the ideal:

    ideal prefill   the same modules, run without vprune as the pruning would ideally cost: vision tower
                    + projector on the full image, decoder layers 0..K-1 over all 640 tokens, a gather of
                    64 text + k visual rows (which rows does not change the cost), decoder layers K..31
                    over those rows (their original positions), final norm and LM head on the last row.
                    (The text model's ``layers`` list and ``norm`` are swapped for the two stages and put
                    back; scoring and selection cost nothing here: that is the patch's overhead.)
    ideal generate  ``generate`` of the unpatched model from ``inputs_embeds`` holding only the k kept
                    visual features (the vision tower still runs on the full image inside the timed
                    region), plus the measured difference ideal prefill - that short input's prefill,
                    because the short input also spares layers 0..K-1 the pruned tokens. (The decode
                    steps of layers 0..K-1 then attend to k instead of 576 image keys: about 2 of 32
                    layers' attention over ~500 keys per step, under 1% of a decode step.)

Speedup = unpatched / patched; overhead = patched / ideal - 1. Results go to a JSON file with the
card, date, versions and command, and a table is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

DEFAULT_OUT = "results/bench_vlm.json"

LLAVA_7B = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    image_token_id=32000, vision_feature_layer=-2,
)
LLAVA_TINY = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu"),
    text=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5),
    image_token_id=120, vision_feature_layer=-2,
)


# ------------------------------------------------------------------------------------- shared helpers
def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "timm", "triton", "vprune"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "not installed"
    return out


def card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    return "vprune " + " ".join(sys.argv[1:]) if os.path.basename(sys.argv[0]) == "vprune" else " ".join(sys.argv)


def require_device(tiny: bool) -> torch.device:
    """CUDA for the real benchmark (a clear error without it); the CPU for ``--tiny``."""
    if tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "use --tiny for a CPU smoke run of the code path")
    return torch.device("cuda")


@contextlib.contextmanager
def default_dtype_device(dtype: torch.dtype, device: torch.device):
    """Create parameters directly in ``dtype`` on ``device`` (no CPU copy of 7B parameters)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def timer(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> Dict[str, float]:
    """Median / min / max milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": iters}


def text_model_of(model: Any) -> Any:
    """The decoder stack (``.layers``, ``.norm``) of a transformers VLM / causal LM."""
    for path in ("model.language_model", "language_model.model", "model", "language_model"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "layers") and hasattr(obj, "norm"):
            return obj
    raise AttributeError(f"no decoder stack with .layers and .norm found in {type(model).__name__}")


@contextlib.contextmanager
def layer_subset(text_model: Any, start: int, stop: Optional[int], final_norm: bool):
    """Temporarily run only ``layers[start:stop]`` of ``text_model`` (final norm optional); restored after."""
    layers, norm = text_model.layers, text_model.norm
    text_model.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        text_model.norm = torch.nn.Identity()
    try:
        yield
    finally:
        text_model.layers = layers
        text_model.norm = norm


@torch.no_grad()
def staged_prefill(text_model: Any, lm_head: Any, embeds: torch.Tensor, keep_idx: torch.Tensor, layer: int,
                   last_only: bool = True) -> torch.Tensor:
    """The ideal pruned prefill: layers 0..K-1 over ``embeds`` [B, L, D], then layers K.. over the rows
    ``keep_idx`` [B, L'] (ascending; their original positions), final norm and LM head.
    Both stages write a KV cache as a real prefill does. Returns logits [B, 1 or L', V]."""
    b, n = embeds.shape[:2]
    dev = embeds.device
    mask = torch.ones(b, n, dtype=torch.long, device=dev)
    pos = torch.arange(n, device=dev).unsqueeze(0).expand(b, n)
    with layer_subset(text_model, 0, layer, final_norm=False):
        h = text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True).last_hidden_state
    h = h.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    with layer_subset(text_model, layer, None, final_norm=True):
        h = text_model(inputs_embeds=h, attention_mask=torch.ones_like(keep_idx), position_ids=keep_idx,
                       use_cache=True).last_hidden_state
    return lm_head(h[:, -1:] if last_only else h)


def fmt_row(cols: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def write_json(path: str, data: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


# ------------------------------------------------------------------------------------------ LLaVA
def build_llava(shape: Dict[str, Any], device: torch.device, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    v, t = shape["vision"], shape["text"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(num_channels=3, **v),
                      text_config=LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **t),
                      image_token_index=shape["image_token_id"], image_seq_length=n_img,
                      vision_feature_layer=shape["vision_feature_layer"], vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    for name in ("image_token_id", "image_token_index"):
        try:
            setattr(cfg, name, shape["image_token_id"])
        except Exception:
            pass
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with default_dtype_device(dtype, device):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
        except Exception:
            pass
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always generate the full length
    return model, n_img


def llava_inputs(shape: Dict[str, Any], batch: int, text_len: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Dict[str, torch.Tensor]:
    """[BOS, 4 text, <image> x N, text_len - 5 text] per row, no padding; random pixels."""
    v = shape["vision"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    g = torch.Generator().manual_seed(seed)
    vocab = shape["image_token_id"] - 10
    head = torch.randint(3, vocab, (batch, 4), generator=g)
    tail = torch.randint(3, vocab, (batch, text_len - 5), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), head,
                     torch.full((batch, n_img), shape["image_token_id"], dtype=torch.long), tail], dim=1)
    pix = torch.randn(batch, 3, v["image_size"], v["image_size"], generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pix.to(device=device, dtype=dtype)}


@torch.no_grad()
def llava_image_embeds(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features [B, N, D] the way LLaVA computes them (feature layer, CLS dropped)."""
    inner = getattr(model, "model", model)
    tower, proj = inner.vision_tower, inner.multi_modal_projector
    layer = model.config.vision_feature_layer
    out = tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[layer][:, 1:]
    return proj(feats)


@torch.no_grad()
def llava_embeds(model: Any, inputs: Dict[str, torch.Tensor], keep_visual: Optional[int] = None) -> tuple:
    """Input embeddings with the image features in place: (embeds [B, L, D], visual positions [N]).
    ``keep_visual`` = k: a shorter sequence holding only the first k visual features."""
    ids = inputs["input_ids"]
    img = llava_image_embeds(model, inputs["pixel_values"])
    emb = model.get_input_embeddings()(ids)
    vis = (ids[0] == model.config.image_token_id).nonzero().flatten()
    emb = emb.clone()
    emb[:, vis] = img.to(emb.dtype)
    if keep_visual is None:
        return emb, vis
    rows = torch.cat([torch.arange(0, int(vis[0]), device=ids.device), vis[:keep_visual],
                      torch.arange(int(vis[-1]) + 1, ids.shape[1], device=ids.device)])
    return emb[:, rows], rows


def keep_index(seq_len: int, vis: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """All non-visual rows + k visual rows spread over the image, ascending: int64 [B, L - N + k]."""
    dev = vis.device
    pick = vis[torch.linspace(0, len(vis) - 1, k, device=dev).round().long()]
    keep = torch.ones(seq_len, dtype=torch.bool, device=dev)
    keep[vis] = False
    keep[pick] = True
    return keep.nonzero().flatten().unsqueeze(0).expand(batch, -1).contiguous()


def run_llava(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    import vprune

    shape = LLAVA_TINY if args.tiny else LLAVA_7B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, n_img = build_llava(shape, device, dtype)
    tm = text_model_of(model)
    keeps = args.keep or ([16, 4] if args.tiny else [576, 192, 64])
    batches = args.batch or ([1, 2] if args.tiny else [1, 8])
    new_tokens = args.new_tokens or (3 if args.tiny else 32)
    warmup, iters = (0, 1) if args.tiny else ((2, 5) if args.quick else (3, 10))
    gwarm, giters = (0, 1) if args.tiny else ((1, 3) if args.quick else (2, 5))
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    rows: List[Dict[str, Any]] = []
    for batch in batches:
        inputs = llava_inputs(shape, batch, args.text_len, device, dtype)
        seq_len = inputs["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits
        if not bool(torch.isfinite(logits).all()):
            raise SystemExit("the random-weight model produced non-finite logits; the benchmark needs finite "
                             "scores (check how this transformers version initialises LlavaForConditionalGeneration)")
        with torch.no_grad():
            base_prefill = timer(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device, warmup, iters)
            vision = timer(lambda: llava_image_embeds(model, inputs["pixel_values"]), device, warmup, iters)
            base_gen = (timer(lambda: model.generate(**inputs, **gen_kw), device, gwarm, giters)
                        if not args.no_generate else None)
        for k in keeps:
            k = min(k, n_img)
            row: Dict[str, Any] = {"batch": batch, "keep": k, "visual_tokens": n_img, "seq_len": seq_len,
                                   "kept_seq_len": seq_len - n_img + k, "layer": args.layer, "new_tokens": new_tokens,
                                   "vision_tower_ms": vision["ms"], "unpatched_prefill": base_prefill,
                                   "unpatched_generate": base_gen}
            _, vis = llava_embeds(model, inputs)
            kidx = keep_index(seq_len, vis, k, batch)

            def ideal_prefill():
                emb, _ = llava_embeds(model, inputs)
                return staged_prefill(tm, model.lm_head, emb, kidx, args.layer)

            def short_prefill():
                emb, _ = llava_embeds(model, inputs, keep_visual=k)
                return model(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long,
                                                                          device=device),
                             use_cache=True, logits_to_keep=1)

            def short_generate():
                emb, _ = llava_embeds(model, inputs, keep_visual=k)
                return model.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long,
                                                                                   device=device), **gen_kw)

            with torch.no_grad():
                row["ideal_prefill"] = timer(ideal_prefill, device, warmup, iters)
                if not args.no_generate:
                    sp = timer(short_prefill, device, warmup, iters)
                    sg = timer(short_generate, device, gwarm, giters)
                    row["short_input_prefill"] = sp
                    row["short_input_generate"] = sg
                    row["ideal_generate"] = {"ms": sg["ms"] + row["ideal_prefill"]["ms"] - sp["ms"],
                                             "note": "short_input_generate + ideal_prefill - short_input_prefill"}
                vprune.patch(model, vprune.VisualPruning(keep=k, layer=args.layer, strategy=args.strategy))
                try:
                    row["patched_prefill"] = timer(lambda: model(**inputs, use_cache=True, logits_to_keep=1),
                                                   device, warmup, iters)
                    st = vprune.stats(model)
                    row["kept_measured"] = (st.get("visual_tokens_after") or [None])[0]
                    if not args.no_generate:
                        row["patched_generate"] = timer(lambda: model.generate(**inputs, **gen_kw), device,
                                                        gwarm, giters)
                finally:
                    vprune.unpatch(model)
            for what in ("prefill", "generate"):
                p, i, u = row.get(f"patched_{what}"), row.get(f"ideal_{what}"), row.get(f"unpatched_{what}")
                if p and u:
                    row[f"{what}_speedup"] = u["ms"] / p["ms"]
                if p and i:
                    row[f"{what}_over_ideal"] = p["ms"] / i["ms"] - 1.0
            rows.append(row)
            print_row(row)
    return {"model": "LLaVA-1.5-7B-shaped (random weights)" if not args.tiny else "tiny LLaVA (random weights)",
            "shape": shape, "dtype": str(dtype), "attention": "sdpa", "strategy": args.strategy,
            "text_tokens": args.text_len, "new_tokens": new_tokens, "rows": rows}


def print_row(row: Dict[str, Any]) -> None:
    def ms(x):
        return f"{x['ms']:.1f}" if x else "-"

    def pct(x):
        return f"{x * 100:+.1f}%" if x is not None else "-"

    def sp(x):
        return f"{x:.2f}x" if x is not None else "-"

    print(f"batch {row['batch']} keep {row['keep']:3d}/{row['visual_tokens']}: prefill unpatched "
          f"{ms(row['unpatched_prefill'])} ms, patched {ms(row.get('patched_prefill'))} ms, ideal "
          f"{ms(row.get('ideal_prefill'))} ms ({sp(row.get('prefill_speedup'))}, {pct(row.get('prefill_over_ideal'))} "
          f"over ideal) | generate({row.get('new_tokens', '')}) unpatched {ms(row.get('unpatched_generate'))}, patched "
          f"{ms(row.get('patched_generate'))}, ideal {ms(row.get('ideal_generate'))} ms "
          f"({sp(row.get('generate_speedup'))}, {pct(row.get('generate_over_ideal'))})", flush=True)


def table(result: Dict[str, Any]) -> str:
    lines = ["| batch | keep | prefill unpatched ms | patched ms | ideal ms | speedup | over ideal | "
             "generate unpatched ms | patched ms | ideal ms | speedup | over ideal |",
             "|" + " --- |" * 12]
    for r in result["rows"]:
        def ms(key):
            x = r.get(key)
            return f"{x['ms']:.1f}" if x else "-"

        def f(key, pct=False):
            x = r.get(key)
            if x is None:
                return "-"
            return f"{x * 100:+.1f}%" if pct else f"{x:.2f}x"

        lines.append(f"| {r['batch']} | {r['keep']}/{r['visual_tokens']} | {ms('unpatched_prefill')} | "
                     f"{ms('patched_prefill')} | {ms('ideal_prefill')} | {f('prefill_speedup')} | "
                     f"{f('prefill_over_ideal', True)} | {ms('unpatched_generate')} | {ms('patched_generate')} | "
                     f"{ms('ideal_generate')} | {f('generate_speedup')} | {f('generate_over_ideal', True)} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8; --tiny: 1 2)")
    parser.add_argument("--keep", type=int, nargs="+", default=None,
                        help="visual tokens kept per image (default 576 192 64; --tiny: 16 8 4)")
    parser.add_argument("--layer", type=int, default=2, help="K, the first decoder layer over the kept tokens")
    parser.add_argument("--strategy", default="fastv")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens per prompt (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32; --tiny: 3)")
    parser.add_argument("--no-generate", action="store_true", help="prefill only")
    parser.add_argument("--quick", action="store_true", help="fewer timed runs")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke test of the code path)")
    parser.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --tiny: none)")


def run_and_report(args: argparse.Namespace, bench, header, table_fn, default_out: str) -> int:
    """Shared tail of ``bench vlm`` / ``bench vla``: run ``bench(args, device)``, add card, date,
    versions and command line, print ``header(result)`` and the table, write the JSON."""
    device = require_device(args.tiny)
    if args.tiny:
        torch.set_num_threads(1)
    t0 = time.time()
    result = bench(args, device)
    result.update(card=card(device), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), versions=versions(),
                  command=command_line(), seconds=round(time.time() - t0, 1))
    print()
    print(header(result))
    print(table_fn(result))
    out = args.out or (None if args.tiny else default_out)
    if out:
        write_json(out, result)
        print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_and_report(
        args, run_llava,
        lambda r: f"{r['model']}, {r['dtype']}, {r['card']}, K={args.layer}, strategy {args.strategy}",
        table, DEFAULT_OUT)
