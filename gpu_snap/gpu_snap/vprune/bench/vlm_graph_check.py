"""Does ``VisualPruning(cuda_graph=True)`` compute what the eager patch computes, on a real GPU?

    python3 -m vprune.bench.vlm_graph_check            # CUDA; a tiny LLaVA in bf16 and fp32, ~1 min
    python3 -m vprune.bench.vlm_graph_check --cpu      # the same checks with the CPU stand-in (no capture)

A tiny random LLaVA (6 decoder layers, 16 image tokens, prune at K=2 to 4 tokens, SDPA), batch 2
with left padding. For each dtype, the eager patched model and the graph-patched model run:
prefill logits + KV cache (``use_cache=True``), an 8-token greedy ``generate`` (every step's logits),
the same again on a second prompt of the same shape (the graph replays with new inputs) and on a
prompt of another shape (a new graph), ``use_cache=False``, and keep = all tokens against the
unpatched model. Prints one line per check (``bit-identical``, or the largest difference) and PASS /
FAIL; exits 1 on FAIL. A check passes when the tokens are the same and the logits / cache differ by
at most ``TOLERANCE[dtype]`` (they are expected to be bit-identical: the same kernels on the same
inputs). It also counts the host syncs torch reports between decoder layer K and the end of a
prefill, eager patch vs replayed graph: the graph must add none (both have the one deliberate sync of
the deferred NaN check of fastv scores at the end of the forward).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from vprune.bench.vlm import LLAVA_TINY

# the bench's tiny LLaVA with 6 decoder layers (K=2 leaves 4 pruned layers in the graph)
SHAPE = dict(LLAVA_TINY, text=dict(LLAVA_TINY["text"], num_hidden_layers=6))
LAYER = 2
KEEP = 4
NEW_TOKENS = 8
#: largest |difference| a check accepts (exact equality is expected; see the module doc)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def prompts(batch_text: List[List[int]], device: torch.device, dtype: torch.dtype, seed: int) -> Dict[str, torch.Tensor]:
    """Left-padded rows ``[BOS, text[:2], <image> x 16, text[2:]]`` with random pixels."""
    n_img = (SHAPE["vision"]["image_size"] // SHAPE["vision"]["patch_size"]) ** 2
    rows = [[1] + t[:2] + [SHAPE["image_token_id"]] * n_img + t[2:] for t in batch_text]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    g = torch.Generator().manual_seed(seed)
    size = SHAPE["vision"]["image_size"]
    pix = torch.randn(len(rows), 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pix.to(device, dtype)}


def run_all(model: Any, inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, Any]]:
    """Per prompt: prefill logits and KV cache, generate's tokens and step logits, use_cache=False logits."""
    out = []
    with torch.no_grad():
        for inp in inputs:
            pre = model(**inp, use_cache=True)
            cache = pre.past_key_values if hasattr(pre, "past_key_values") else pre.cache
            kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            gen = model.generate(**inp, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 suppress_tokens=[SHAPE["image_token_id"]], output_logits=True,
                                 return_dict_in_generate=True)
            nocache = model(**inp, use_cache=False).logits
            out.append({"logits": pre.logits, "kv": kv, "tokens": gen.sequences, "steps": list(gen.logits),
                        "nocache": nocache})
    return out


def max_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> Optional[float]:
    """Largest |a - b| over matching tensors (None if shapes differ)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def compare(name: str, got: Dict[str, Any], want: Dict[str, Any], tol: float) -> Tuple[bool, str]:
    """One line: tokens, prefill logits, KV cache, step logits and use_cache=False logits."""
    parts, ok = [], True
    same_tokens = torch.equal(got["tokens"], want["tokens"])
    ok &= same_tokens
    parts.append(f"tokens {'same' if same_tokens else 'DIFFER'}")
    for what, g, w in (("prefill logits", [got["logits"]], [want["logits"]]),
                       ("kv cache", [t for kv in got["kv"] for t in kv], [t for kv in want["kv"] for t in kv]),
                       ("step logits", got["steps"], want["steps"]),
                       ("use_cache=False logits", [got["nocache"]], [want["nocache"]])):
        d = max_diff(g, w)
        exact = d is not None and all(torch.equal(x, y) for x, y in zip(g, w))
        ok &= d is not None and d <= tol
        parts.append(f"{what} " + ("bit-identical" if exact else ("SHAPES DIFFER" if d is None else f"max diff {d:.3g}")))
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: " + ", ".join(parts)


def syncs_after_layer(model: Any, inp: Dict[str, torch.Tensor], layer: int) -> Optional[int]:
    """Host syncs torch's sync debug mode reports from decoder layer ``layer`` to the end of one prefill."""
    if inp["input_ids"].device.type != "cuda":
        return None
    from vprune.bench.vlm import text_model_of

    marker = text_model_of(model).layers[layer].register_forward_pre_hook(lambda m, a: warnings.warn("@K"))
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.no_grad():
                    model(**inp, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        marker.remove()
    msgs = [str(w.message) for w in rec]
    if "@K" not in msgs:
        return None
    return sum("synchroniz" in m.lower() for m in msgs[msgs.index("@K") + 1:])


def check(device: torch.device, dtype: torch.dtype, standin: bool = False,
          log: Callable[[str], None] = print) -> bool:
    """All checks for one dtype; True if every one passed."""
    import vprune
    from vprune.bench.vlm import build_llava
    from vprune.integrations import _llm_pruning as lp

    model, n_img = build_llava(SHAPE, device, dtype)
    inputs = [prompts([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]], device, dtype, seed=0),
              prompts([[15, 14, 13, 12], [11, 10, 9, 8, 7, 6, 5]], device, dtype, seed=1),  # same shape
              prompts([[5, 6, 7], [8, 9, 10, 11, 12]], device, dtype, seed=2)]  # another shape
    tol = TOLERANCE[dtype]

    def graph_patch(keep: int) -> Any:
        vprune.patch(model, vprune.VisualPruning(keep=keep, layer=LAYER, strategy="fastv", cuda_graph=True))
        if standin:
            model._vprune.runtime.graph_backend = lp.NoCaptureBackend()
        return model._vprune.runtime

    results: List[bool] = []
    with vprune.patched(model, vprune.VisualPruning(keep=KEEP, layer=LAYER, strategy="fastv")):
        eager = run_all(model, inputs)
        eager_syncs = syncs_after_layer(model, inputs[0], LAYER)
    pruner = graph_patch(KEEP)
    try:
        graph = run_all(model, inputs)
        st = vprune.stats(model)
        syncs = syncs_after_layer(model, inputs[0], LAYER)
    finally:
        vprune.unpatch(model)
    for name, g, w in zip(("prompt 1 (captures)", "prompt 2, same shape (replays)", "prompt 3, new shape (captures)"),
                          graph, eager):
        ok, line = compare(f"{dtype} keep {KEEP}/{n_img} graph vs eager patch, {name}", g, w, tol)
        results.append(ok)
        log(line)
    pruned = eager[0]["logits"].shape[1] < inputs[0]["input_ids"].shape[1]
    used = st["cuda_graph"]["captured"] >= 2 and st["cuda_graph"]["replays"] > 0 and not pruner.graphs
    results.append(pruned and used)
    log(f"{'PASS' if pruned and used else 'FAIL'} {dtype} graphs used: {st['cuda_graph']} (pruned: {pruned}; "
        f"freed on unpatch: {not pruner.graphs})")
    if syncs is not None and eager_syncs is not None:
        results.append(syncs <= eager_syncs)
        log(f"{'PASS' if syncs <= eager_syncs else 'FAIL'} {dtype} host syncs from layer {LAYER} to the end of a "
            f"prefill: replayed graph {syncs}, eager patch {eager_syncs}")

    plain = run_all(model, inputs[:1])
    graph_patch(n_img)
    try:
        full = run_all(model, inputs[:1])
    finally:
        vprune.unpatch(model)
    ok, line = compare(f"{dtype} keep all {n_img}/{n_img} graph vs unpatched", full[0], plain[0], tol)
    results.append(ok)
    log(line)
    return all(results)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with the no-capture stand-in backend")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    if args.cpu:
        device, standin = torch.device("cpu"), True
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device, standin = torch.device("cuda"), False
    else:
        print("this check needs a CUDA GPU (torch.cuda.is_available() is False); --cpu runs the CPU stand-in")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no-capture stand-in)"
    print(f"vlm_graph_check on {name}, torch {torch.__version__}")
    ok = all([check(device, getattr(torch, d), standin) for d in args.dtype])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
