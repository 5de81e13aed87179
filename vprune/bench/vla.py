"""OpenVLA-7B-shaped control-step latency: unpatched vs vprune-patched vs the ideal (GPU).

    vprune bench vla                    # batch 1, keep 100/50/25/12.5% of 256, K=3, dual, bf16: ~1-2 min on an H100
    vprune bench vla --quick
    vprune bench vla --tiny             # a tiny policy on the CPU: checks the code path, times mean nothing

The policy is ``vprune.testbed.policy.TestbedVLAPolicy`` (built like OpenVLA's remote-code
``OpenVLAForActionPrediction``: ``vision_backbone.featurizer`` + ``fused_featurizer`` timm ViTs on a
6-channel image, an MLP ``projector``, a Llama ``language_model``, the projected patches inserted
after BOS, action tokens = the last 256 vocabulary ids, ``predict_action``), patched by the same
``integrations/openvla.py`` that patches OpenVLA. Shapes: OpenVLA-7B's LM (Llama-2-7B: 32 layers,
hidden 4096, 32 heads, MLP 11008, vocab 32064), 224 px images with 14 px patches -> 256 visual tokens,
7 action tokens. Differences from OpenVLA-7B: both vision towers are ViT-L/14 (OpenVLA's second is
SigLIP-so400m: 1152 wide, 27 layers) and the projector has 2 layers (OpenVLA's fused one has 3);
the LM, which is what pruning acts on, has OpenVLA's shapes. Random bf16 weights created on the GPU.

One control step = ``predict_action`` (prefill with the vision tower, then 7 greedy action tokens,
decoded to a numpy action: one host sync as in a robot loop). Timed with CUDA events, median of
``--iters`` steps after warm-up (the patched policy first runs its ``warmup`` unpruned steps, which are
not timed). The ideal: ``predict_action`` of the unpatched policy whose projector output is cut to the
k kept patches (a forward hook: the LM then sees [BOS, k patches, prompt] at every layer), plus the
measured difference "ideal prefill - that short prefill", where the ideal prefill runs decoder layers
0..K-1 over the full sequence and layers K.. over the kept rows (see ``vprune.bench.vlm``).

Not measured: ``torch.compile`` and StaticCache runs (the OpenVLA integration does not support a
StaticCache; see its module docstring).
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import torch

from .vlm import (card, command_line, default_dtype_device, require_device, run_and_report, staged_prefill,
                  timer, versions, write_json)

DEFAULT_OUT = "results/bench_vla.json"

OPENVLA_7B = dict(image_size=224, patch_size=14, vision_dim=1024, vision_depth=24, vision_heads=16,
                  text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                            rms_norm_eps=1e-6),
                  prompt_tokens=24, action_dim=7, layer=3)
OPENVLA_TINY = dict(image_size=56, patch_size=14, vision_dim=32, vision_depth=2, vision_heads=2,
                    text=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              rms_norm_eps=1e-6),
                    prompt_tokens=12, action_dim=7, layer=2)


def build_policy(shape: Dict[str, Any], device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig

    from vprune.testbed.policy import TestbedVLAConfig, TestbedVLAPolicy

    d = shape["action_dim"]
    text = LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **shape["text"])
    cfg = TestbedVLAConfig(image_size=shape["image_size"], patch_size=shape["patch_size"],
                           vision_dim=shape["vision_dim"], vision_depth=shape["vision_depth"],
                           vision_heads=shape["vision_heads"], use_fused_vision_backbone=True, text_config=text,
                           n_action_bins=256,
                           norm_stats={"bench": {"action": {"q01": [-1.0] * d, "q99": [1.0] * d,
                                                            "mask": [True] * (d - 1) + [False]}}})
    cfg._attn_implementation = "sdpa"
    text._attn_implementation = "sdpa"
    torch.manual_seed(0)
    try:
        with default_dtype_device(dtype, device):
            policy = TestbedVLAPolicy(cfg)
    except RuntimeError as exc:  # an initialiser without a kernel for ``dtype``: create in fp32 on the device
        print(f"note: creating the policy in {dtype} failed ({exc}); creating it in float32 on {device} and casting")
        with default_dtype_device(torch.float32, device):
            policy = TestbedVLAPolicy(cfg)
    policy = policy.to(device=device, dtype=dtype).eval()
    if hasattr(policy, "set_attn_implementation"):
        try:
            policy.set_attn_implementation("sdpa")
        except Exception:
            pass
    return policy


def policy_inputs(shape: Dict[str, Any], batch: int, device: torch.device, dtype: torch.dtype,
                  seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = shape["text"]["vocab_size"] - 256 - 8  # prompt ids below the action bins
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                     torch.randint(3, vocab, (batch, shape["prompt_tokens"]), generator=g)], dim=1)
    pix = torch.randn(batch, 6, shape["image_size"], shape["image_size"], generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pix.to(device=device, dtype=dtype)}


def run_policy(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    import vprune

    shape = OPENVLA_TINY if args.tiny else OPENVLA_7B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    layer = args.layer or shape["layer"]
    policy = build_policy(shape, device, dtype)
    n_vis = policy.num_patches
    lm = policy.language_model
    tm = lm.model
    warmup, iters = (0, 1) if args.tiny else ((2, 5) if args.quick else (3, 15))
    rows: List[Dict[str, Any]] = []
    inputs = policy_inputs(shape, args.batch, device, dtype)
    step = lambda: policy.predict_action(**inputs, unnorm_key="bench")  # noqa: E731
    with torch.no_grad():
        base_step = timer(step, device, warmup, iters)
        base_prefill = timer(lambda: policy(**inputs, use_cache=True), device, warmup, iters)
        mm, _, _, _ = policy.embed_multimodal(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    seq_len = mm.shape[1]
    for frac in args.keep:
        k = max(1, min(n_vis, int(round(frac * n_vis))))
        row: Dict[str, Any] = {"batch": args.batch, "keep_fraction": frac, "keep": k, "visual_tokens": n_vis,
                               "seq_len": seq_len, "layer": layer, "strategy": args.strategy,
                               "action_tokens": shape["action_dim"], "unpatched_step": base_step,
                               "unpatched_prefill": base_prefill}
        kidx = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, 1 + k),
                          torch.arange(1 + n_vis, seq_len)]).to(device).unsqueeze(0).expand(args.batch, -1)

        def ideal_prefill():
            emb, _, _, _ = policy.embed_multimodal(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
            return staged_prefill(tm, lm.lm_head, emb, kidx, layer, last_only=False)

        hook = policy.projector.register_forward_hook(lambda mod, a, out: out[:, :k])
        try:
            with torch.no_grad():
                row["short_input_step"] = timer(step, device, warmup, iters)
                row["short_input_prefill"] = timer(lambda: policy(**inputs, use_cache=True), device, warmup, iters)
        finally:
            hook.remove()
        with torch.no_grad():
            row["ideal_prefill"] = timer(ideal_prefill, device, warmup, iters)
        row["ideal_step"] = {"ms": row["short_input_step"]["ms"] + row["ideal_prefill"]["ms"]
                             - row["short_input_prefill"]["ms"],
                             "note": "short_input_step + ideal_prefill - short_input_prefill"}
        cfg = vprune.VisualPruning(keep=float(frac), layer=layer, strategy=args.strategy)
        vprune.patch(policy, cfg)
        try:
            vprune.reset(policy)
            with torch.no_grad():
                for _ in range(cfg.effective_warmup):  # unpruned warm-up steps of the episode: not timed
                    step()
                row["patched_step"] = timer(step, device, warmup, iters)
            st = vprune.stats(policy)
            per = (st.get("per_sample") or [{}])[0]
            row["kept_measured"] = per.get("visual_after")
            row["pruned"] = per.get("pruned")
            row["control_steps_run"] = st.get("control_steps")
        finally:
            vprune.unpatch(policy)
        row["speedup"] = base_step["ms"] / row["patched_step"]["ms"]
        row["over_ideal"] = row["patched_step"]["ms"] / row["ideal_step"]["ms"] - 1.0
        rows.append(row)
        print(f"keep {frac * 100:5.1f}% ({k:3d}/{n_vis}): control step unpatched {base_step['ms']:.1f} ms, patched "
              f"{row['patched_step']['ms']:.1f} ms, ideal {row['ideal_step']['ms']:.1f} ms "
              f"({row['speedup']:.2f}x, {row['over_ideal'] * 100:+.1f}% over ideal); kept {row['kept_measured']}",
              flush=True)
    return {"model": ("OpenVLA-7B-shaped TestbedVLAPolicy (random weights)" if not args.tiny
                      else "tiny TestbedVLAPolicy (random weights)"),
            "shape": shape, "dtype": str(dtype), "attention": "sdpa", "rows": rows}


def table(result: Dict[str, Any]) -> str:
    lines = ["| batch | keep | control step unpatched ms | patched ms | ideal ms | speedup | over ideal | "
             "ideal prefill ms | unpatched prefill ms |", "|" + " --- |" * 9]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['keep_fraction'] * 100:g}% ({r['keep']}) | {r['unpatched_step']['ms']:.1f} | "
                     f"{r['patched_step']['ms']:.1f} | {r['ideal_step']['ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['over_ideal'] * 100:+.1f}% | {r['ideal_prefill']['ms']:.1f} | "
                     f"{r['unpatched_prefill']['ms']:.1f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125],
                        help="kept fraction of the 256 visual tokens")
    parser.add_argument("--layer", type=int, default=None, help="K (default 3; --tiny: 2)")
    parser.add_argument("--strategy", default="dual")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--tiny", action="store_true", help="tiny policy on the CPU (a smoke test of the code path)")
    parser.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --tiny: none)")


def run(args: argparse.Namespace) -> int:
    return run_and_report(args, run_policy, lambda r: f"{r['model']}, {r['dtype']}, {r['card']}",
                          table, DEFAULT_OUT)
