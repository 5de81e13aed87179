"""OpenVLA-7B-shaped control-step latency: unpatched vs vprune-patched vs the ideal (GPU).

    vprune bench vla                    # batch 1, keep 100/50/25/12.5% of 256, K=3, dual, bf16: ~2.5 min on an H100 (estimate)
    vprune bench vla --quick            # fewer rounds (~1.5 min, estimate)
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
decoded to a numpy action: one host sync as in a robot loop). Variants, one set of weights on the GPU
(clones share every parameter and buffer, see ``vprune.bench.vlm.shared_clone``):

    unpatched       the policy as built
    patched@f       a clone patched once with ``VisualPruning(keep=f, layer=K, strategy=dual)``; it runs its
                    ``warmup`` unpruned control steps before anything is timed and keeps its action history
                    across rounds (one long episode on the same observation: the steady state of a robot loop)
    short@f         a clone whose projector output is cut to the k kept patches (a forward hook: the LM sees
                    [BOS, k patches, prompt] at every layer): its step and its prefill
    ideal prefill   decoder layers 0..K-1 over the full sequence, layers K.. over the kept rows (see
                    ``vprune.bench.vlm.staged_prefill``)
    ideal step      short@f step + (ideal prefill - short@f prefill), per round

Timing as in ``vprune.bench.vlm``: ``--warmup`` untimed runs of every variant, then ``--rounds`` rounds
that each run every variant once in a seeded shuffled order; wall ms = perf_counter around the call
with the device synchronised before and after; median, IQR, min, max. Device ms = GPU busy time of one
call (union of kernel / memcpy / memset intervals in a torch.profiler trace, median of
``--device-runs`` calls). At batch 1 an eager step is launch-bound: wall - device is the time the GPU
waits for the host (Python, kernel launches, ``generate``'s per-token syncs), which pruning does not
shrink; the table shows both, so a patched/ideal gap in wall time that is absent in device time is
host overhead (hooks, scoring and selection launches), not kernel work.

Checks recorded in the JSON (``checks``): keep = 100% gives the unpatched policy's action tokens; at
every keep the first action token equals the argmax of the ideal prefill run on the rows the patch
kept (its logits compared too), and every timed patched step was pruned to k tokens. After timing,
every clone is unpatched and must give the unpatched tokens with its original class and no hooks.

Not measured: ``torch.compile``, CUDA graphs and StaticCache runs (the OpenVLA integration does not
support a StaticCache; see its module docstring).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from .vlm import (TIMING_METHOD, checks_line, default_dtype_device, device_ms, device_time, device_time_available,
                  header, hook_count, interleaved, memory_allocated, run_and_report, shared_clone, staged_prefill, summarize)

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


def _kept_rows(n_vis: int, seq_len: int, kept_visual: List[int], batch: int, device: torch.device) -> torch.Tensor:
    """[BOS, the kept patches (visual index i is row 1 + i), the prompt]: int64 [B, L']."""
    rows = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.tensor(sorted(kept_visual), dtype=torch.long),
                      torch.arange(1 + n_vis, seq_len)])
    return rows.to(device).unsqueeze(0).expand(batch, -1)


@torch.no_grad()
def _generate(policy: Any, inputs: Dict[str, torch.Tensor], n: int) -> Any:
    """What ``predict_action`` runs, keeping the token ids and the first step's logits."""
    return policy.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=policy.config.pad_token_id, output_logits=True, return_dict_in_generate=True)


def _eos_ids(policy: Any) -> List[int]:
    eos = getattr(policy.generation_config, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def run_policy(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    import vprune

    tiny = args.tiny
    shape = OPENVLA_TINY if tiny else OPENVLA_7B
    dtype = torch.float32 if tiny else torch.bfloat16
    layer = args.layer or shape["layer"]
    rounds = args.rounds or (2 if tiny else (10 if args.quick else 20))
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    dev_runs = args.device_runs if device_time_available(device) and not args.no_device_time else 0
    n_act = shape["action_dim"]
    t_build = time.time()
    policy = build_policy(shape, device, dtype)
    n_vis = policy.num_patches
    lm = policy.language_model
    tm = lm.model
    inputs = policy_inputs(shape, args.batch, device, dtype)
    fracs = list(dict.fromkeys(args.keep))
    ks = {f: max(1, min(n_vis, int(round(f * n_vis)))) for f in fracs}

    mem_model = memory_allocated(device)
    patched: Dict[float, Any] = {}
    short: Dict[float, Any] = {}
    cfgs: Dict[float, Any] = {}
    for f in fracs:
        cfgs[f] = vprune.VisualPruning(keep=float(f), layer=layer, strategy=args.strategy)
        patched[f] = vprune.patch(shared_clone(policy), cfgs[f])
        short[f] = shared_clone(policy)
        short[f].projector.register_forward_hook(lambda mod, a, out, k=ks[f]: out[:, :k])
    mem_clones = memory_allocated(device)
    build_s = time.time() - t_build
    print(f"built the policy and {2 * len(fracs)} clones sharing its weights in {build_s:.1f} s"
          + (f" (clones added {(mem_clones - mem_model) / 2**20:.1f} MiB)" if mem_model is not None else ""), flush=True)

    with torch.no_grad():
        mm, _, _, _ = policy.embed_multimodal(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
        seq_len = mm.shape[1]
        ref = _generate(policy, inputs, n_act)
        if not bool(torch.isfinite(ref.logits[0]).all()):
            raise SystemExit("the random-weight policy produced non-finite logits; the benchmark needs finite scores")
    ref_tokens = ref.sequences[:, -n_act:]

    def step(p: Any) -> Callable[[], Any]:
        return lambda: p.predict_action(**inputs, unnorm_key="bench")

    def prefill(p: Any) -> Callable[[], Any]:
        return lambda: p(**inputs, use_cache=True)

    def ideal_prefill(k: int) -> Callable[[], Any]:
        kidx = _kept_rows(n_vis, seq_len, list(range(k)), args.batch, device)

        def fn():
            emb, _, _, _ = policy.embed_multimodal(inputs["input_ids"], inputs["pixel_values"],
                                                   inputs["attention_mask"])
            return staged_prefill(tm, lm.lm_head, emb, kidx, layer, last_only=False)
        return fn

    variants: Dict[str, Callable[[], Any]] = {"unpatched": step(policy), "unpatched_prefill": prefill(policy)}
    for f in fracs:
        variants[f"patched@{f:g}"] = step(patched[f])
        variants[f"short@{f:g}"] = step(short[f])
        variants[f"short_prefill@{f:g}"] = prefill(short[f])
        variants[f"ideal_prefill@{f:g}"] = ideal_prefill(ks[f])

    # The patched policies' unpruned warm-up steps of the episode (temporal history), then the checks.
    with torch.no_grad():
        for f in fracs:
            vprune.reset(patched[f])
            for _ in range(cfgs[f].effective_warmup):
                variants[f"patched@{f:g}"]()
    checks: Dict[str, Dict[str, Any]] = {}
    eos = _eos_ids(policy)
    for f in fracs:
        c: Dict[str, Any] = {}
        out = _generate(patched[f], inputs, n_act)
        tokens = out.sequences[:, -n_act:]
        st = vprune.stats(patched[f])
        per = st.get("per_sample") or [{}]
        c["pruned"] = all(bool(s.get("pruned")) for s in per)
        c["in_warmup"] = any(bool(s.get("warmup")) for s in per)
        c["kept"] = [s.get("visual_after") for s in per]
        c["first_tokens_row0"] = tokens[0].tolist()
        c["tokens_agree_with_unpatched"] = float((tokens == ref_tokens).float().mean())
        if ks[f] >= n_vis:
            c["tokens_identical_to_unpatched"] = bool(torch.equal(tokens, ref_tokens))
        if per and per[0].get("kept_indices") is not None and len({len(s["kept_indices"]) for s in per}) == 1:
            with torch.no_grad():
                rows = torch.cat([_kept_rows(n_vis, seq_len, s["kept_indices"], 1, device) for s in per])
                emb, _, _, _ = policy.embed_multimodal(inputs["input_ids"], inputs["pixel_values"],
                                                       inputs["attention_mask"])
                staged = staged_prefill(tm, lm.lm_head, emb, rows, layer)[:, -1].float()
            first = out.logits[0].float()
            c["first_logits_max_abs_diff_vs_staged"] = float((first - staged).abs().max())
            if eos:
                staged[:, eos] = float("-inf")  # min_new_tokens masks EOS in generate
            c["first_token_matches_staged"] = bool((tokens[:, 0] == staged.argmax(-1)).all())
        checks[f"{f:g}"] = c
    steps_before = {f: vprune.stats(patched[f])["control_steps"] for f in fracs}

    with torch.no_grad():
        t0 = time.time()
        times = interleaved(variants, device, warmup, rounds, seed=args.seed)
        t1 = time.time()
        dev = {n: device_time(fn, device, dev_runs) for n, fn in variants.items()} if dev_runs else {}
        t2 = time.time()
    stats = {n: summarize(t) for n, t in times.items()}
    for f in fracs:  # the last timed patched step: past the episode warm-up, k tokens kept per row
        st = vprune.stats(patched[f])
        per = st.get("per_sample") or [{}]
        c = checks[f"{f:g}"]
        c["timed_steps_in_warmup"] = any(bool(s.get("warmup")) for s in per)
        c["timed_steps_kept"] = [s.get("visual_after") for s in per]
        c["timed_steps_kept_k"] = all(s.get("visual_after") == ks[f] for s in per)
        c["control_steps_during_timing"] = st["control_steps"] - steps_before[f]

    rows: List[Dict[str, Any]] = []
    u = stats["unpatched"]
    u_dev = device_ms(dev.get("unpatched"))
    for f in fracs:
        k = ks[f]
        s_step, s_pre, i_pre = (times[f"short@{f:g}"], times[f"short_prefill@{f:g}"], times[f"ideal_prefill@{f:g}"])
        ideal_runs = [a + b - c for a, b, c in zip(s_step, i_pre, s_pre)]
        ideal = summarize(ideal_runs)
        ideal["note"] = "per round: short_input step + ideal prefill - short_input prefill"
        p = stats[f"patched@{f:g}"]
        row: Dict[str, Any] = {
            "batch": args.batch, "keep_fraction": f, "keep": k, "visual_tokens": n_vis, "seq_len": seq_len,
            "kept_seq_len": seq_len - n_vis + k, "layer": layer, "strategy": args.strategy, "action_tokens": n_act,
            "step": {"unpatched": u, "patched": p, "ideal": ideal, "short_input": stats[f"short@{f:g}"]},
            "prefill": {"unpatched": stats["unpatched_prefill"], "ideal": stats[f"ideal_prefill@{f:g}"],
                        "short_input": stats[f"short_prefill@{f:g}"]},
            "speedup": u["ms"] / p["ms"], "patched_over_ideal": p["ms"] / ideal["ms"],
            "ideal_speedup": u["ms"] / ideal["ms"], "checks": checks[f"{f:g}"],
            # per round (the variants of a round ran back to back: host drift between rounds cancels)
            "paired": {"patched_over_ideal": statistics.median(a / b for a, b in zip(times[f"patched@{f:g}"], ideal_runs)),
                       "speedup": statistics.median(a / b for a, b in zip(times["unpatched"], times[f"patched@{f:g}"]))},
        }
        if dev:
            parts = [device_ms(dev.get(n)) for n in (f"short@{f:g}", f"ideal_prefill@{f:g}", f"short_prefill@{f:g}")]
            i_dev = parts[0] + parts[1] - parts[2] if None not in parts else None
            p_dev = device_ms(dev.get(f"patched@{f:g}"))
            row["step_device"] = {
                "unpatched": dev.get("unpatched"), "patched": dev.get(f"patched@{f:g}"),
                "ideal": ({"ms": i_dev, "note": "short_input step + ideal prefill - short_input prefill"}
                          if i_dev is not None else None),
                "short_input": dev.get(f"short@{f:g}")}
            row["prefill_device"] = {"unpatched": dev.get("unpatched_prefill"),
                                     "ideal": dev.get(f"ideal_prefill@{f:g}"),
                                     "short_input": dev.get(f"short_prefill@{f:g}")}
            if None not in (u_dev, p_dev, i_dev):
                row["device_speedup"] = u_dev / p_dev
                row["device_patched_over_ideal"] = p_dev / i_dev
                row["ideal_device_speedup"] = u_dev / i_dev
                row["host_ms"] = {"unpatched": u["ms"] - u_dev, "patched": p["ms"] - p_dev, "ideal": ideal["ms"] - i_dev}
                # If pruning saved exactly the ideal's device time and nothing else (host time unchanged):
                row["speedup_bound_from_device_savings"] = u["ms"] / max(1e-9, u["ms"] - (u_dev - i_dev))
        rows.append(row)
        print(f"keep {f * 100:5.1f}% ({k:3d}/{n_vis}): step unpatched {u['ms']:.1f} [{u['iqr_ms']:.1f}] ms, patched "
              f"{p['ms']:.1f} [{p['iqr_ms']:.1f}], ideal {ideal['ms']:.1f} [{ideal['iqr_ms']:.1f}] "
              f"({row['speedup']:.2f}x, patched/ideal {row['patched_over_ideal']:.3f}; per-round medians "
              f"{row['paired']['speedup']:.2f}x, {row['paired']['patched_over_ideal']:.3f})"
              + (f"; device {u_dev:.1f} / {p_dev:.1f} / {i_dev:.1f} ms" if row.get("device_speedup") else ""),
              flush=True)

    unpatch_checks: Dict[str, Any] = {}
    hooks_ref = hook_count(policy)
    for f in fracs:
        vprune.unpatch(patched[f])
        tokens = _generate(patched[f], inputs, n_act).sequences[:, -n_act:]
        unpatch_checks[f"{f:g}"] = {"class_restored": type(patched[f]) is type(policy),
                                    "hooks_left": hook_count(patched[f]) - hooks_ref,
                                    "tokens_identical": bool(torch.equal(tokens, ref_tokens))}
    patched.clear()
    short.clear()
    return {"model": ("OpenVLA-7B-shaped TestbedVLAPolicy (random weights)" if not tiny
                      else "tiny TestbedVLAPolicy (random weights)"),
            "shape": shape, "dtype": str(dtype), "attention": "sdpa", "layer": layer, "strategy": args.strategy,
            "batch": args.batch,
            "timing": {"method": TIMING_METHOD, "rounds": rounds, "warmup": warmup,
                       "patched_episode_warmup_steps": {f"{f:g}": cfgs[f].effective_warmup for f in fracs},
                       "device_runs": dev_runs, "seed": args.seed,
                       "seconds": {"rounds": round(t1 - t0, 1), "device_time": round(t2 - t1, 1)}},
            "memory": {"model_bytes": mem_model, "with_clones_bytes": mem_clones,
                       "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None},
            "build_seconds": round(build_s, 1), "variants": stats, "device": dev,
            "unpatch_checks": unpatch_checks, "rows": rows}


def _ms(x: Optional[Dict[str, Any]], iqr: bool = True) -> str:
    if not x or x.get("ms") is None:
        return "-"
    return f"{x['ms']:.1f} [{x['iqr_ms']:.1f}]" if iqr and "iqr_ms" in x else f"{x['ms']:.1f}"


def _f(v: Optional[float], fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def table(result: Dict[str, Any]) -> str:
    dev = any(r.get("step_device") for r in result["rows"])
    lines = [f"control step (prefill + {result['shape']['action_dim']} action tokens), batch {result['batch']}: wall ms, "
             f"median [IQR] of {result['timing']['rounds']} interleaved rounds; per round: the median of the "
             f"per-round ratios"
             + ("; device ms = GPU busy time per step; host ms = wall - device" if dev else "")]
    head = "| keep | unpatched | patched | ideal | speedup | patched/ideal | per round: speedup | patched/ideal |"
    if dev:
        head += (" device: unpatched | patched | ideal | speedup | patched/ideal | host ms: unpatched | patched | "
                 "ideal |")
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in result["rows"]:
        s = r["step"]
        line = (f"| {r['keep_fraction'] * 100:g}% ({r['keep']}) | {_ms(s['unpatched'])} | {_ms(s['patched'])} | "
                f"{_ms(s['ideal'])} | {_f(r['speedup'], '.2f')}x | {_f(r['patched_over_ideal'], '.3f')} | "
                f"{_f(r.get('paired', {}).get('speedup'), '.2f')}x | {_f(r.get('paired', {}).get('patched_over_ideal'), '.3f')} |")
        if dev:
            d, h = r.get("step_device") or {}, r.get("host_ms") or {}
            line += (f" {_ms(d.get('unpatched'), False)} | {_ms(d.get('patched'), False)} | {_ms(d.get('ideal'), False)} | "
                     f"{_f(r.get('device_speedup'), '.2f')}x | {_f(r.get('device_patched_over_ideal'), '.3f')} | "
                     f"{_f(h.get('unpatched'), '.1f')} | {_f(h.get('patched'), '.1f')} | {_f(h.get('ideal'), '.1f')} |")
        lines.append(line)
    lines.append("")
    lines.append("prefill alone (ms): " + "; ".join(
        f"{r['keep_fraction'] * 100:g}%: unpatched {_ms(r['prefill']['unpatched'])}, ideal {_ms(r['prefill']['ideal'])}, "
        f"short input {_ms(r['prefill']['short_input'])}" for r in result["rows"]))
    bounds = [(r["keep_fraction"], r.get("speedup_bound_from_device_savings")) for r in result["rows"]]
    if any(b for _, b in bounds):
        lines.append("speedup if only the ideal's device time were saved (host time unchanged): " + ", ".join(
            f"{f * 100:g}%: {b:.2f}x" for f, b in bounds if b))
    lines.append(checks_line(result))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125],
                        help="kept fraction of the 256 visual tokens")
    parser.add_argument("--layer", type=int, default=None, help="K (default 3; --tiny: 2)")
    parser.add_argument("--strategy", default="dual")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 20; --quick 10; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs per variant (default 3; --tiny 1), after the patched policies' "
                             "unpruned episode warm-up steps")
    parser.add_argument("--device-runs", type=int, default=3, help="profiled steps per variant for device time (median)")
    parser.add_argument("--no-device-time", action="store_true", help="skip the profiled device-time runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--tiny", action="store_true", help="tiny policy on the CPU (a smoke test of the code path)")
    parser.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --tiny: none)")


def run(args: argparse.Namespace) -> int:
    return run_and_report(args, run_policy, header, table, DEFAULT_OUT)
