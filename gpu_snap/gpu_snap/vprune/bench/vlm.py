"""LLaVA-1.5-7B-shaped prefill and generate latency: unpatched vs vprune-patched vs the ideal (GPU).

    vprune bench vlm                    # batch 1 and 8, keep 576/192/64 of 576, K=2, bf16, SDPA: ~3-4 min on an H100 (estimate)
    vprune bench vlm --quick            # fewer rounds (~2 min, estimate)
    vprune bench vlm --tiny             # a tiny LLaVA on the CPU: checks the code path, times mean nothing

The model is a transformers ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's shapes (CLIP
ViT-L/14 at 336 px -> 576 visual tokens, feature layer -2, 2-layer GELU projector, Llama-7B LM:
32 layers, hidden 4096, 32 heads, MLP 11008, vocab 32064) and random bf16 weights created directly on
the GPU (nothing on the CPU, nothing downloaded). Prompt: 64 text tokens + 576 image tokens per row
(640), no padding.

Variants (one set of weights on the GPU): the unpatched model; for each keep k, a clone of the model
that shares every parameter and buffer (``shared_clone``: new module objects, same tensors) patched
with ``VisualPruning(keep=k, layer=K, strategy=fastv)`` once, before timing; and the ideal:

    ideal prefill   the unpatched modules, run as the pruning would ideally cost: vision tower + projector
                    on the full image, decoder layers 0..K-1 over all 640 tokens, a gather of 64 text + k
                    visual rows (which rows does not change the cost), decoder layers K..31 over those rows
                    (their original positions), final norm and LM head on the last row. Scoring and
                    selection cost nothing here: that is the patch's overhead.
    patched+graph   (prefill rounds; ``--no-cuda-graph`` leaves it out) a second clone per keep patched with
                    ``VisualPruning(..., cuda_graph=True)``: decoder layers K..31 of the prefill run as a
                    captured CUDA graph (captured by the checks / warm-up, replayed in the timed runs). With
                    ``--tiny`` (CPU) it uses the no-capture stand-in: the code path, not the speed.
    ideal generate  ``generate`` of the unpatched model from ``inputs_embeds`` holding only the k kept
                    visual features ("short input"; the vision tower still runs on the full image inside
                    the timed region), plus the measured difference ideal prefill - short-input prefill
                    (medians), because the short input also spares layers 0..K-1 the pruned tokens. (Its
                    decode steps of layers 0..K-1 attend to k instead of 576 image keys: about 2 of 32
                    layers' attention over ~500 keys per step, under 1% of a decode step.)

Timing (``interleaved``): every variant is built once and warmed up with ``--warmup`` untimed runs
(covers cuBLAS/SDPA heuristics, Triton compilation and allocator growth); then ``--rounds`` rounds,
each running every variant once in a seeded shuffled order; wall time per run = perf_counter around
the call with the device synchronised before and after. Prefill and generate are two phases (prefill
variants interleaved with each other, generate variants with each other) because generate runs are
~10-30x longer. Reported per variant: median, IQR, min, max, every run. ``--device-time`` adds the GPU
busy time per call (union of kernel / memcpy / memset intervals in a torch.profiler trace, median of
``--device-runs`` profiled calls), which separates kernel work from host overhead.

Checks recorded in the JSON (``checks``): the patched prefill's last logits against the ideal prefill
run on the very rows the patch kept (max abs difference, argmax agreement), the first generated token
against that ideal's argmax, keep = all bit-identical to unpatched (logits and tokens), patched+graph's
prefill logits against the eager patch's (bit-identical expected), and after the timing every clone unpatched gives the unpatched model's logits bit for bit, with its original class
and no hooks left.

Speedup = unpatched / patched; patched/ideal = patched / ideal (1.00 = no overhead); graph speedup and
graph/ideal the same for patched+graph. Results go to a
JSON file with the card, date, versions and command, and markdown tables are printed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

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

TIMING_METHOD = ("interleaved rounds: each variant warmed up, then every round runs each variant once in a seeded "
                 "shuffled order; wall ms = perf_counter around the call, device synchronised before and after; "
                 "device ms = GPU busy time (union of kernel/memcpy/memset intervals) in a torch.profiler trace")


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


# ---------------------------------------------------------------------------------- timing harness
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall milliseconds of one ``fn()``, the device synchronised before and after, Python's cyclic
    garbage collector run before and paused during the call (as ``timeit`` does: a collection that
    lands inside one variant's call would charge it for every variant's garbage)."""
    sync(device)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        sync(device)
        return (time.perf_counter() - t0) * 1e3
    finally:
        if was_enabled:
            gc.enable()


def summarize(times: Sequence[float]) -> Dict[str, Any]:
    """Median, quartiles (inclusive method), IQR, min, max and every run, in ms. ``ms`` = the median."""
    s = sorted(float(t) for t in times)
    if not s:
        raise ValueError("summarize() needs at least one time")
    med = statistics.median(s)
    q1, q3 = (statistics.quantiles(s, n=4, method="inclusive")[::2] if len(s) >= 2 else (s[0], s[0]))
    return {"ms": med, "median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": s[0],
            "max_ms": s[-1], "runs": len(s), "all_ms": [round(float(t), 4) for t in times]}


def shifted(stats: Dict[str, Any], delta_ms: float, note: str) -> Dict[str, Any]:
    """``stats`` moved by ``delta_ms`` (a composite: measured variant + a measured correction)."""
    out = {k: (v + delta_ms if k in ("ms", "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms") else v)
           for k, v in stats.items() if k != "all_ms"}
    out["all_ms"] = [round(t + delta_ms, 4) for t in stats.get("all_ms", [])]
    out["note"] = note
    return out


def interleaved(variants: Dict[str, Callable[[], Any]], device: torch.device, warmup: int, rounds: int,
                seed: int) -> Dict[str, List[float]]:
    """Time every variant ``rounds`` times, interleaved: ``warmup`` untimed runs of each first, then
    ``rounds`` rounds that each run every variant once in an order shuffled by ``random.Random(seed)``.
    Returns the wall ms per run, per variant, in round order."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync(device)
    rng = random.Random(seed)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        for name in order:
            times[name].append(time_call(variants[name], device))
    return times


GPU_TRACE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_busy(events: Iterable[Dict[str, Any]], categories: Sequence[str] = GPU_TRACE_CATEGORIES) -> Dict[str, float]:
    """Busy time of the complete ("ph": "X") chrome-trace events in ``categories``: ``busy_ms`` the union
    of their intervals (overlap across streams counted once), ``sum_ms`` the plain sum, ``count``."""
    cats = {c.lower() for c in categories}
    iv = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                if e.get("ph") == "X" and str(e.get("cat", "")).lower() in cats and "ts" in e)
    busy = 0.0
    cur_s = cur_e = None
    for s, e in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return {"busy_ms": busy / 1e3, "sum_ms": sum(e - s for s, e in iv) / 1e3, "count": float(len(iv))}


def profiled_busy(fn: Callable[[], Any], device: torch.device, activities: Sequence[Any],
                  categories: Sequence[str]) -> Dict[str, float]:
    """Run ``fn()`` once under torch.profiler and measure the trace events in ``categories``."""
    from torch.profiler import profile

    sync(device)
    with profile(activities=list(activities)) as prof:
        fn()
        sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    return trace_busy(events, categories)


def device_time(fn: Callable[[], Any], device: torch.device, runs: int) -> Optional[Dict[str, Any]]:
    """GPU busy ms of one ``fn()`` (median over ``runs`` profiled calls): the kernel work without the
    host's share. None on the CPU or with ``runs`` = 0; ``{"error": ...}`` if the profiler fails (the
    benchmark goes on)."""
    if device.type != "cuda" or runs <= 0:
        return None
    from torch.profiler import ProfilerActivity

    try:
        got = [profiled_busy(fn, device, [ProfilerActivity.CPU, ProfilerActivity.CUDA], GPU_TRACE_CATEGORIES)
               for _ in range(runs)]
    except Exception as exc:  # a profiler problem must not lose the wall-time results
        return {"error": f"{type(exc).__name__}: {exc}"}
    busy = [g["busy_ms"] for g in got]
    if max(busy) <= 0.0:
        return {"error": "the profiler trace held no GPU kernel events"}
    return {"ms": statistics.median(busy), "min_ms": min(busy), "max_ms": max(busy),
            "kernel_sum_ms": statistics.median(g["sum_ms"] for g in got),
            "kernels": int(statistics.median(g["count"] for g in got)), "runs": runs}


def device_time_available(device: torch.device) -> bool:
    """Device time is measured on CUDA only (the CPU has no separate device timeline)."""
    return device.type == "cuda"


def device_ms(d: Optional[Dict[str, Any]]) -> Optional[float]:
    return d.get("ms") if isinstance(d, dict) else None


def shared_clone(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with new module objects that share every parameter and buffer (no weight memory):
    patching the clone adds hooks, class swaps and attribute changes to the clone's modules only."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, memo)
    for (na, a), (nb, b) in zip(model.state_dict(keep_vars=True).items(), clone.state_dict(keep_vars=True).items()):
        if na != nb or a is not b:
            raise RuntimeError(f"shared_clone: {na} is not shared")
    return clone


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on every submodule."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def memory_allocated(device: torch.device) -> Optional[int]:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


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


def kept_rows_from_stats(st: Dict[str, Any], seq_len: int, visual: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The prefill rows a patched LLaVA kept, from ``vprune.stats``: every non-visual row + the kept visual
    positions, ascending, int64 [B, L']."""
    keep = torch.ones(seq_len, dtype=torch.bool)
    keep[visual.cpu()] = False
    rows = []
    for kept in st["kept_indices"]:
        m = keep.clone()
        m[torch.tensor(kept, dtype=torch.long)] = True
        rows.append(m.nonzero().flatten())
    return torch.stack(rows).to(device)


@torch.no_grad()
def llava_checks(model: Any, clone: Any, k: int, n_img: int, inputs: Dict[str, torch.Tensor], layer: int,
                 ref_logits: torch.Tensor, ref_tokens: Optional[torch.Tensor], gen_kw: Dict[str, Any]) -> Dict[str, Any]:
    """What the patched variant computes, against the ideal on the very rows it kept (see the module doc)."""
    import vprune

    tm = text_model_of(model)
    out: Dict[str, Any] = {}
    logits = clone(**inputs, logits_to_keep=1).logits
    st = vprune.stats(clone)
    seq_len = inputs["input_ids"].shape[1]
    emb, vis = llava_embeds(model, inputs)
    out["kept_measured"] = (st.get("visual_tokens_after") or [n_img])[0]
    if st.get("pruned"):
        rows = kept_rows_from_stats(st, seq_len, vis, emb.device)
    else:  # nothing dropped (keep >= the image's tokens): the ideal is the whole sequence
        rows = torch.arange(seq_len, device=emb.device).unsqueeze(0).expand(emb.shape[0], -1)
    staged = staged_prefill(tm, model.lm_head, emb, rows, layer)
    out["prefill_max_abs_diff_vs_staged"] = float((logits.float() - staged.float()).abs().max())
    out["prefill_argmax_matches_staged"] = bool((logits.argmax(-1) == staged.argmax(-1)).all())
    if k >= n_img:
        out["prefill_logits_bit_identical_to_unpatched"] = bool(torch.equal(logits, ref_logits))
    if ref_tokens is not None:
        n = ref_tokens.shape[1]
        tokens = clone.generate(**inputs, **gen_kw)[:, -n:]
        out["first_tokens_row0"] = tokens[0, :8].tolist()
        out["first_token_matches_staged"] = bool((tokens[:, 0] == staged[:, -1].argmax(-1)).all())
        out["tokens_agree_with_unpatched"] = float((tokens == ref_tokens).float().mean())
        if k >= n_img:
            out["tokens_identical_to_unpatched"] = bool(torch.equal(tokens, ref_tokens))
    return out


@torch.no_grad()
def graph_checks(clone: Any, graph_clone: Any, inputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """patched+graph against the eager patch on one prefill (the graph's first call captures it)."""
    import vprune

    want = clone(**inputs, use_cache=True, logits_to_keep=1).logits
    got = graph_clone(**inputs, use_cache=True, logits_to_keep=1).logits  # captures
    again = graph_clone(**inputs, use_cache=True, logits_to_keep=1).logits  # replays
    st = vprune.stats(graph_clone).get("cuda_graph") or {}
    diff = max(float((got.float() - want.float()).abs().max()), float((again.float() - want.float()).abs().max()))
    return {"graph_prefill_bit_identical_to_patched": bool(torch.equal(got, want) and torch.equal(again, want)),
            "graph_prefill_max_abs_diff_vs_patched": diff, "graph_last_prefill": st.get("last_prefill")}


def add_graph_ratios(row: Dict[str, Any]) -> None:
    """patched+graph's speedup over unpatched and ratio to the ideal (wall and device), where measured."""
    p = row["prefill"]
    if "patched_graph" not in p:
        return
    row["prefill_graph_speedup"] = p["unpatched"]["ms"] / p["patched_graph"]["ms"]
    row["prefill_graph_over_ideal"] = p["patched_graph"]["ms"] / p["ideal"]["ms"]
    dv = row.get("prefill_device")
    if dv and all(device_ms(dv.get(x)) for x in ("unpatched", "patched_graph", "ideal")):
        row["prefill_device_graph_speedup"] = device_ms(dv["unpatched"]) / device_ms(dv["patched_graph"])
        row["prefill_device_graph_over_ideal"] = device_ms(dv["patched_graph"]) / device_ms(dv["ideal"])


def run_llava(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    import vprune

    tiny = args.tiny
    shape = LLAVA_TINY if tiny else LLAVA_7B
    dtype = torch.float32 if tiny else torch.bfloat16
    t_build = time.time()
    model, n_img = build_llava(shape, device, dtype)
    tm = text_model_of(model)
    keeps = sorted({min(k, n_img) for k in (args.keep or ([16, 4] if tiny else [576, 192, 64]))}, reverse=True)
    batches = args.batch or ([1, 2] if tiny else [1, 8])
    new_tokens = args.new_tokens or (3 if tiny else 32)
    rounds = args.rounds or (2 if tiny else (8 if args.quick else 15))
    gen_rounds = args.gen_rounds or (2 if tiny else (3 if args.quick else 5))
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    gen_warmup = args.gen_warmup if args.gen_warmup is not None else 1
    dev_runs = args.device_runs if device_time_available(device) else 0
    gen = not args.no_generate
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    mem_model = memory_allocated(device)
    clones: Dict[int, Any] = {}
    for k in keeps:
        clones[k] = vprune.patch(shared_clone(model), vprune.VisualPruning(keep=k, layer=args.layer,
                                                                           strategy=args.strategy))
    graph_clones: Dict[int, Any] = {}
    if args.cuda_graph:
        for k in keeps:
            graph_clones[k] = vprune.patch(shared_clone(model), vprune.VisualPruning(
                keep=k, layer=args.layer, strategy=args.strategy, cuda_graph=True))
            if device.type != "cuda":  # --tiny: the CPU stand-in runs the graph path without capturing
                from vprune.integrations._llm_pruning import NoCaptureBackend

                graph_clones[k]._vprune.runtime.graph_backend = NoCaptureBackend()
    mem_clones = memory_allocated(device)
    build_s = time.time() - t_build
    print(f"built the model and {len(clones) + len(graph_clones)} patched clones sharing its weights in {build_s:.1f} s"
          + (f" (clones added {(mem_clones - mem_model) / 2**20:.1f} MiB)" if mem_model is not None else ""), flush=True)

    def variants_for(inputs: Dict[str, torch.Tensor], kidx: Dict[int, torch.Tensor]):
        """The prefill and generate variants on ``inputs``: name -> a no-argument call."""
        ones_mask = lambda emb: torch.ones(emb.shape[:2], dtype=torch.long, device=device)  # noqa: E731

        def ideal_prefill(k):
            emb, _ = llava_embeds(model, inputs)
            return staged_prefill(tm, model.lm_head, emb, kidx[k], args.layer)

        def short_prefill(k):
            emb, _ = llava_embeds(model, inputs, keep_visual=k)
            return model(inputs_embeds=emb, attention_mask=ones_mask(emb), use_cache=True, logits_to_keep=1)

        def short_generate(k):
            emb, _ = llava_embeds(model, inputs, keep_visual=k)
            return model.generate(inputs_embeds=emb, attention_mask=ones_mask(emb), **gen_kw)

        prefill_v: Dict[str, Callable[[], Any]] = {
            "unpatched": lambda: model(**inputs, use_cache=True, logits_to_keep=1),
            "vision": lambda: llava_image_embeds(model, inputs["pixel_values"]),
        }
        gen_v: Dict[str, Callable[[], Any]] = {"unpatched": lambda: model.generate(**inputs, **gen_kw)} if gen else {}
        for k in keeps:
            c = clones[k]
            prefill_v[f"patched@{k}"] = lambda c=c: c(**inputs, use_cache=True, logits_to_keep=1)
            if k in graph_clones:
                prefill_v[f"graph@{k}"] = lambda c=graph_clones[k]: c(**inputs, use_cache=True, logits_to_keep=1)
            prefill_v[f"ideal@{k}"] = lambda k=k: ideal_prefill(k)
            if gen:
                prefill_v[f"short@{k}"] = lambda k=k: short_prefill(k)
                gen_v[f"patched@{k}"] = lambda c=c: c.generate(**inputs, **gen_kw)
                gen_v[f"short@{k}"] = lambda k=k: short_generate(k)
        return prefill_v, gen_v

    # Wall time, batch by batch (every variant of a batch interleaved with the others).
    done: List[Dict[str, Any]] = []
    for batch in batches:
        t_batch = time.time()
        inputs = llava_inputs(shape, batch, args.text_len, device, dtype)
        seq_len = inputs["input_ids"].shape[1]
        with torch.no_grad():
            ref_logits = model(**inputs, logits_to_keep=1).logits
            if not bool(torch.isfinite(ref_logits).all()):
                raise SystemExit("the random-weight model produced non-finite logits; the benchmark needs finite "
                                 "scores (check how this transformers version initialises LlavaForConditionalGeneration)")
            ref_tokens = model.generate(**inputs, **gen_kw)[:, -new_tokens:] if gen else None
            # a second unpatched run: on a GPU greedy generate of random-weight bf16 models need not
            # reproduce itself, and then no variant can be held to bit-identical tokens
            ref_again = model.generate(**inputs, **gen_kw)[:, -new_tokens:] if gen else None
            _, vis = llava_embeds(model, inputs)
        prefill_v, gen_v = variants_for(inputs, {k: keep_index(seq_len, vis, k, batch) for k in keeps})
        checks = {k: llava_checks(model, clones[k], k, n_img, inputs, args.layer, ref_logits, ref_tokens, gen_kw)
                  for k in keeps}
        if gen:
            for k in keeps:
                if k >= n_img:
                    checks[k]["unpatched_generate_reproduces_itself"] = bool(torch.equal(ref_tokens, ref_again))
        for k, graph_clone in graph_clones.items():  # (not ``gc``: the module's garbage-collector import)
            checks[k].update(graph_checks(clones[k], graph_clone, inputs))
        with torch.no_grad():
            t0 = time.time()
            pre_t = interleaved(prefill_v, device, warmup, rounds, seed=args.seed + 1000 * batch)
            t1 = time.time()
            gen_t = interleaved(gen_v, device, gen_warmup, gen_rounds, seed=args.seed + 1000 * batch + 1) if gen else {}
            t2 = time.time()
        done.append({"batch": batch, "seq_len": seq_len, "inputs": inputs, "ref_logits": ref_logits, "checks": checks,
                     "prefill_v": prefill_v, "gen_v": gen_v,
                     "pre_s": {n: summarize(t) for n, t in pre_t.items()},
                     "gen_s": {n: summarize(t) for n, t in gen_t.items()},
                     "seconds": {"prefill_phase": round(t1 - t0, 1), "generate_phase": round(t2 - t1, 1),
                                 "total": round(time.time() - t_batch, 1)}})
        print(f"batch {batch}: timed in {time.time() - t_batch:.1f} s", flush=True)

    # Device time last: a profiler session must not precede any wall-time measurement.
    t_dev = time.time()
    for d in done:
        with torch.no_grad():
            d["pre_dev"] = ({n: device_time(fn, device, dev_runs) for n, fn in d["prefill_v"].items()}
                            if dev_runs and args.device_time in ("prefill", "all") else {})
            d["gen_dev"] = ({n: device_time(fn, device, dev_runs) for n, fn in d["gen_v"].items()}
                            if dev_runs and args.device_time == "all" else {})
    dev_s = time.time() - t_dev

    rows: List[Dict[str, Any]] = []
    per_batch: List[Dict[str, Any]] = []
    for d in done:
        batch, seq_len, checks = d["batch"], d["seq_len"], d["checks"]
        pre_s, gen_s, pre_dev, gen_dev = d["pre_s"], d["gen_s"], d["pre_dev"], d["gen_dev"]
        per_batch.append({"batch": batch, "vision_tower": pre_s["vision"], "vision_tower_device": pre_dev.get("vision"),
                          "seconds": d["seconds"]})
        for k in keeps:
            row: Dict[str, Any] = {"batch": batch, "keep": k, "visual_tokens": n_img, "seq_len": seq_len,
                                   "kept_seq_len": seq_len - n_img + k, "layer": args.layer, "new_tokens": new_tokens,
                                   "kept_measured": checks[k].pop("kept_measured"), "checks": checks[k]}
            row["prefill"] = {"unpatched": pre_s["unpatched"], "patched": pre_s[f"patched@{k}"],
                              "ideal": pre_s[f"ideal@{k}"]}
            if pre_dev:
                row["prefill_device"] = {"unpatched": pre_dev["unpatched"], "patched": pre_dev[f"patched@{k}"],
                                         "ideal": pre_dev[f"ideal@{k}"]}
            if f"graph@{k}" in pre_s:
                row["prefill"]["patched_graph"] = pre_s[f"graph@{k}"]
                if pre_dev:
                    row["prefill_device"]["patched_graph"] = pre_dev.get(f"graph@{k}")
            if gen:
                row["prefill"]["short_input"] = pre_s[f"short@{k}"]
                correction = pre_s[f"ideal@{k}"]["ms"] - pre_s[f"short@{k}"]["ms"]
                row["generate"] = {
                    "unpatched": gen_s["unpatched"], "patched": gen_s[f"patched@{k}"],
                    "short_input": gen_s[f"short@{k}"],
                    "ideal": shifted(gen_s[f"short@{k}"], correction,
                                     "short_input generate + (ideal prefill - short_input prefill), medians")}
                if gen_dev:
                    parts = [device_ms(x) for x in (gen_dev.get(f"short@{k}"), pre_dev.get(f"ideal@{k}"),
                                                    pre_dev.get(f"short@{k}"))]
                    ideal_dev = ({"ms": parts[0] + parts[1] - parts[2],
                                  "note": "short_input generate + (ideal prefill - short_input prefill)"}
                                 if None not in parts else None)
                    row["generate_device"] = {"unpatched": gen_dev["unpatched"], "patched": gen_dev[f"patched@{k}"],
                                              "short_input": gen_dev[f"short@{k}"], "ideal": ideal_dev}
            for what in ("prefill", "generate"):
                r = row.get(what)
                if r:
                    row[f"{what}_speedup"] = r["unpatched"]["ms"] / r["patched"]["ms"]
                    row[f"{what}_patched_over_ideal"] = r["patched"]["ms"] / r["ideal"]["ms"]
                dv = row.get(f"{what}_device")
                if dv and all(device_ms(dv.get(x)) for x in ("unpatched", "patched", "ideal")):
                    row[f"{what}_device_speedup"] = device_ms(dv["unpatched"]) / device_ms(dv["patched"])
                    row[f"{what}_device_patched_over_ideal"] = device_ms(dv["patched"]) / device_ms(dv["ideal"])
            add_graph_ratios(row)
            rows.append(row)
            print_row(row)
    inputs, ref_logits = done[-1]["inputs"], done[-1]["ref_logits"]

    # Exactness of unpatch: every clone back to the original class, no hooks left, the same logits bit for bit.
    unpatch_checks = {}
    hooks_ref = hook_count(model)
    for k, c in itertools.chain(clones.items(), ((f"{k}+graph", c) for k, c in graph_clones.items())):
        vprune.unpatch(c)
        with torch.no_grad():
            logits = c(**inputs, logits_to_keep=1).logits
        unpatch_checks[str(k)] = {"class_restored": type(c) is type(model), "hooks_left": hook_count(c) - hooks_ref,
                                  "logits_bit_identical": bool(torch.equal(logits, ref_logits))}
    clones.clear()
    graph_clones.clear()
    return {"model": "LLaVA-1.5-7B-shaped (random weights)" if not tiny else "tiny LLaVA (random weights)",
            "shape": shape, "dtype": str(dtype), "attention": "sdpa", "strategy": args.strategy, "layer": args.layer,
            "text_tokens": args.text_len, "new_tokens": new_tokens,
            "cuda_graph_variant": (None if not args.cuda_graph else
                                   "captured CUDA graph" if device.type == "cuda" else "no-capture CPU stand-in"),
            "timing": {"method": TIMING_METHOD, "prefill_rounds": rounds, "prefill_warmup": warmup,
                       "generate_rounds": gen_rounds if gen else 0,
                       "generate_warmup": (gen_warmup + 1) if gen else 0,
                       "generate_warmup_note": "--gen-warmup untimed runs + the check run",
                       "device_time": args.device_time if dev_runs else "none", "device_runs": dev_runs,
                       "seed": args.seed},
            "memory": {"model_bytes": mem_model, "with_clones_bytes": mem_clones,
                       "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None},
            "build_seconds": round(build_s, 1), "device_time_seconds": round(dev_s, 1), "batches": per_batch,
            "unpatch_checks": unpatch_checks, "rows": rows}


def _ms(x: Optional[Dict[str, Any]], iqr: bool = True) -> str:
    if not x or x.get("ms") is None:
        return "-"
    return f"{x['ms']:.1f} [{x['iqr_ms']:.1f}]" if iqr and "iqr_ms" in x else f"{x['ms']:.1f}"


def _x(v: Optional[float]) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _r(v: Optional[float]) -> str:
    return f"{v:.3f}" if v is not None else "-"


def print_row(row: Dict[str, Any]) -> None:
    p, g = row["prefill"], row.get("generate")
    line = (f"batch {row['batch']} keep {row['keep']:3d}/{row['visual_tokens']}: prefill unpatched {_ms(p['unpatched'])}, "
            f"patched {_ms(p['patched'])}, ideal {_ms(p['ideal'])} ms ({_x(row.get('prefill_speedup'))}, "
            f"patched/ideal {_r(row.get('prefill_patched_over_ideal'))})")
    if "patched_graph" in p:
        line += (f", patched+graph {_ms(p['patched_graph'])} ms ({_x(row.get('prefill_graph_speedup'))}, "
                 f"graph/ideal {_r(row.get('prefill_graph_over_ideal'))})")
    if g:
        line += (f" | generate({row['new_tokens']}) unpatched {_ms(g['unpatched'])}, patched {_ms(g['patched'])}, "
                 f"ideal {_ms(g['ideal'])} ms ({_x(row.get('generate_speedup'))}, "
                 f"patched/ideal {_r(row.get('generate_patched_over_ideal'))})")
    print(line, flush=True)


def table(result: Dict[str, Any]) -> str:
    t = result["timing"]
    out = []
    for what, n_rounds in (("prefill", t["prefill_rounds"]), ("generate", t["generate_rounds"])):
        rows = [r for r in result["rows"] if r.get(what)]
        if not rows:
            continue
        dev = any(r.get(f"{what}_device") for r in rows)
        title = f"{what}" + (f" ({result['new_tokens']} tokens)" if what == "generate" else "")
        out.append(f"{title}: wall ms, median [IQR] of {n_rounds} interleaved rounds"
                   + ("; device ms = GPU busy time per call" if dev else ""))
        graph = any("patched_graph" in r[what] for r in rows)
        head = "| batch | keep | unpatched | patched | ideal | speedup | patched/ideal |"
        if graph:
            head += " patched+graph | graph speedup | graph/ideal |"
        if dev:
            head += " device: unpatched | patched | ideal | speedup | patched/ideal |"
            if graph:
                head += " patched+graph | graph speedup | graph/ideal |"
        out.append(head)
        out.append("|" + " --- |" * (head.count("|") - 1))
        for r in rows:
            w = r[what]
            line = (f"| {r['batch']} | {r['keep']}/{r['visual_tokens']} | {_ms(w['unpatched'])} | {_ms(w['patched'])} | "
                    f"{_ms(w['ideal'])} | {_x(r.get(f'{what}_speedup'))} | {_r(r.get(f'{what}_patched_over_ideal'))} |")
            if graph:
                line += (f" {_ms(w.get('patched_graph'))} | {_x(r.get(f'{what}_graph_speedup'))} | "
                         f"{_r(r.get(f'{what}_graph_over_ideal'))} |")
            if dev:
                d = r.get(f"{what}_device") or {}
                line += (f" {_ms(d.get('unpatched'), False)} | {_ms(d.get('patched'), False)} | "
                         f"{_ms(d.get('ideal'), False)} | {_x(r.get(f'{what}_device_speedup'))} | "
                         f"{_r(r.get(f'{what}_device_patched_over_ideal'))} |")
                if graph:
                    line += (f" {_ms(d.get('patched_graph'), False)} | {_x(r.get(f'{what}_device_graph_speedup'))} | "
                             f"{_r(r.get(f'{what}_device_graph_over_ideal'))} |")
            out.append(line)
        out.append("")
    out.append(checks_line(result))
    return "\n".join(out).rstrip()


def checks_line(result: Dict[str, Any]) -> str:
    """One line summing up the correctness checks of a run (details in the JSON)."""
    rows = result["rows"]

    def count(key: str) -> str:
        got = [r["checks"][key] for r in rows if key in r["checks"]]
        return f"{sum(bool(g) for g in got)}/{len(got)}" if got else "-"

    diffs = [r["checks"][k] for r in rows for k in ("prefill_max_abs_diff_vs_staged", "first_logits_max_abs_diff_vs_staged")
             if k in r["checks"]]
    unpatch = result.get("unpatch_checks", {}).values()
    exact = all(u.get("class_restored") and not u.get("hooks_left")
                and u.get("logits_bit_identical", u.get("tokens_identical")) for u in unpatch)
    return ("checks: keep=all tokens identical to unpatched " + count("tokens_identical_to_unpatched")
            + (" (two unpatched runs identical " + count("unpatched_generate_reproduces_itself") + ")"
               if any("unpatched_generate_reproduces_itself" in r["checks"] for r in rows) else "")
            + "; first token = argmax of the ideal on the kept rows " + count("first_token_matches_staged")
            + (f" (max |logit diff| {max(diffs):.3g})" if diffs else "")
            + ("; patched+graph prefill = eager patch bit for bit " + count("graph_prefill_bit_identical_to_patched")
               if any("graph_prefill_bit_identical_to_patched" in r["checks"] for r in rows) else "")
            + f"; unpatch exact {'yes' if exact and unpatch else 'NO'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8; --tiny: 1 2)")
    parser.add_argument("--keep", type=int, nargs="+", default=None,
                        help="visual tokens kept per image (default 576 192 64; --tiny: 16 4)")
    parser.add_argument("--layer", type=int, default=2, help="K, the first decoder layer over the kept tokens")
    parser.add_argument("--strategy", default="fastv")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens per prompt (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32; --tiny: 3)")
    parser.add_argument("--no-generate", action="store_true", help="prefill only")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="leave out the patched+graph prefill variant (VisualPruning(cuda_graph=True))")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timed rounds of the prefill variants (default 15; --quick 8; --tiny 2)")
    parser.add_argument("--gen-rounds", type=int, default=None,
                        help="interleaved timed rounds of the generate variants (default 5; --quick 3; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per prefill variant (default 3; --tiny 1)")
    parser.add_argument("--gen-warmup", type=int, default=None,
                        help="untimed runs per generate variant besides the check run (default 1)")
    parser.add_argument("--device-time", choices=("none", "prefill", "all"), default="prefill",
                        help="GPU busy time per call from a torch.profiler trace: none, prefill variants (default) "
                             "or all (also generate: slower)")
    parser.add_argument("--device-runs", type=int, default=3, help="profiled calls per variant (median; default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
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
    args._result = result  # for callers (tests) that want the numbers without a file
    return 0


def header(r: Dict[str, Any]) -> str:
    """The one-line description printed above a bench's table (model, card, K, versions, time)."""
    return (f"{r['model']}, {r['dtype']}, {r['card']}, K={r['layer']}, strategy {r['strategy']}, "
            f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, {r['seconds']} s")


def run(args: argparse.Namespace) -> int:
    return run_and_report(args, run_llava, header, table, DEFAULT_OUT)
