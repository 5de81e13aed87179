"""Where an aMUSEd-256-shaped step spends its GPU time: CUDA events around each top-level module.

    python3 -m vprune.bench.nat_profile OUT.json      # GPU, diffusers; about a minute

Builds the ``vprune bench nat`` model (``UVit2DModel``, aMUSEd-256 shapes, random fp16 weights)
and, at batch 8 and 32, reports milliseconds per module (the 22 ``transformer_layers`` as one span)
of eager forwards:

* ``vanilla``: the unpatched model on a half-masked 16x16 token grid, plus one ``AmusedScheduler.step``;
* ``cache_k<k>`` / ``reuse_k<k>``: a cheap step of ``NATCache(mode)`` (after a restart and a full
  step), which runs every per-token module on the ``k`` computed rows; the depthwise convolutions
  and the merge into the cached logits (``merge_ms``, inside ``forward_ms``) are the work left on
  all 256 tokens.
"""
import json
import sys
from typing import Any, Callable, Dict, List

import torch


def _module_events(model: Any) -> tuple:
    events: Dict[str, List[list]] = {}
    hooks = []
    for name, mod in model.named_children():
        def pre(m, a, name=name):
            e = torch.cuda.Event(enable_timing=True); e.record(); events.setdefault(name, []).append([e, None])

        def post(m, a, o, name=name):
            e = torch.cuda.Event(enable_timing=True); e.record(); events[name][-1][1] = e
        if name == "transformer_layers":
            hooks.append(mod[0].register_forward_pre_hook(pre)); hooks.append(mod[-1].register_forward_hook(post))
        else:
            hooks.append(mod.register_forward_pre_hook(pre)); hooks.append(mod.register_forward_hook(post))
    return events, hooks


def _profile(model: Any, setup: Callable[[], None], step: Callable[[], Any],
             after: Callable[[Any], None] = lambda out: None) -> Dict[str, Any]:
    """ms per module of ``step()`` (run after ``setup()``) and of ``after(step output)``
    (``scheduler_step_ms``); the last of 6 runs."""
    events, hooks = _module_events(model)
    try:
        for _ in range(6):
            setup()
            events.clear()
            torch.cuda.synchronize()
            s0, s1, s2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            s0.record()
            out = step()
            s1.record()
            after(out)
            s2.record()
            torch.cuda.synchronize()
        row = {"forward_ms": s0.elapsed_time(s1), "scheduler_step_ms": s1.elapsed_time(s2)}
        for n, lst in events.items():
            row[n] = round(sum(a.elapsed_time(b) for a, b in lst if b is not None), 3)
        if "mlm_layer" in events:
            row["merge_ms"] = round(events["mlm_layer"][-1][1].elapsed_time(s1), 3)
    finally:
        for h in hooks:
            h.remove()
    return row


def main(out_path: str, device: str = "cuda", shape: Any = None, batches: Any = (8, 32)) -> Dict[int, Dict[str, Any]]:
    """Profile and write ``out_path``; ``device``/``shape`` (a ``UVit2DModel`` config) are for dry runs."""
    from diffusers import AmusedScheduler, UVit2DModel

    import vprune
    from vprune.bench.nat import _inputs
    from vprune.integrations.amused import amused_256_config

    cfg = shape or amused_256_config()
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = UVit2DModel(**cfg).to(device, dtype).eval()
    sched = AmusedScheduler(mask_token_id=cfg["vocab_size"] - 1)
    mask_id, side = cfg["vocab_size"] - 1, cfg["sample_size"]
    n = side * side
    out: Dict[int, Dict[str, Any]] = {}
    for B in batches:
        ehs, pooled, mc = _inputs(B, cfg, 0.0, device, dtype)
        ids = torch.randint(0, cfg["codebook_size"], (B, side, side), device=device)

        def call(x: torch.Tensor) -> torch.Tensor:
            return model(x, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)

        def masked(count: int) -> torch.Tensor:     # the first ``count`` tokens (row-major) masked
            x = ids.clone()
            x.view(B, -1)[:, :count] = mask_id
            return x

        def sched_step(logits: torch.Tensor) -> None:
            sched.set_timesteps(12, (2, 0), device)
            sched.step(model_output=logits, timestep=sched.timesteps[3], sample=half,
                       generator=torch.Generator(device).manual_seed(0))

        half = masked(n // 2)
        res: Dict[str, Any] = {}
        with torch.inference_mode():
            res["vanilla"] = _profile(model, lambda: None, lambda: call(half), sched_step)
            # cheap steps: restart (all masked), full (128 masked: k would be 256), then the profiled step
            for mode, n_prev, n_now in (("cache", n // 2, n * 25 // 64), ("reuse", n // 2, n * 25 // 64),
                                        ("reuse", n * 10 // 64, n * 15 // 128)):
                with vprune.patched(model, vprune.NATCache(mode=mode, refresh=1000)):
                    prev, now = masked(n_prev), masked(n_now)

                    def setup() -> None:
                        vprune.reset(model)
                        call(masked(n))
                        call(prev)
                    row = _profile(model, setup, lambda: call(now))
                    row["k"] = model._vprune.runtime.history[-1]["k"]
                    row["kind"] = model._vprune.runtime.history[-1]["kind"]
                res[f"{mode}_k{row['k']}"] = row
        out[B] = res
        print(B, json.dumps(res), flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1])
