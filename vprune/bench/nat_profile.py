"""Where an aMUSEd-256-shaped step spends its GPU time: CUDA events around each top-level module.

    python3 -m vprune.bench.nat_profile OUT.json      # GPU, diffusers; about a minute

Builds the ``vprune bench nat`` model (``UVit2DModel``, aMUSEd-256 shapes, random fp16 weights),
runs eager forwards at batch 8 and 32 on a half-masked 16x16 token grid plus one
``AmusedScheduler.step``, and reports milliseconds per module (the 22 ``transformer_layers`` as one
span). NATCache only shortens ``transformer_layers``; the rest bounds its speedup.
"""
import json
import sys
from typing import Any, Dict

import torch


def main(out_path: str) -> Dict[int, Dict[str, Any]]:
    from diffusers import AmusedScheduler, UVit2DModel

    from vprune.bench.nat import _inputs
    from vprune.integrations.amused import amused_256_config

    cfg = amused_256_config()
    torch.manual_seed(0)
    model = UVit2DModel(**cfg).to("cuda", torch.float16).eval()
    sched = AmusedScheduler(mask_token_id=cfg["vocab_size"] - 1)
    out = {}
    for B in (8, 32):
        ehs, pooled, mc = _inputs(B, cfg, 0.0, "cuda", torch.float16)
        ids = torch.randint(0, 8192, (B, 16, 16), device="cuda")
        ids[:, :8] = cfg["vocab_size"] - 1
        events = {}
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
        with torch.inference_mode():
            for it in range(6):
                events.clear()
                torch.cuda.synchronize()
                s0 = torch.cuda.Event(enable_timing=True); s1 = torch.cuda.Event(enable_timing=True)
                s2 = torch.cuda.Event(enable_timing=True)
                s0.record()
                logits = model(ids, micro_conds=mc, pooled_text_emb=pooled, encoder_hidden_states=ehs)
                s1.record()
                sched.set_timesteps(12, (2, 0), "cuda")
                sched.step(model_output=logits, timestep=sched.timesteps[3], sample=ids,
                           generator=torch.Generator("cuda").manual_seed(0))
                s2.record()
                torch.cuda.synchronize()
            row = {"forward_ms": s0.elapsed_time(s1), "scheduler_step_ms": s1.elapsed_time(s2)}
            for n, lst in events.items():
                row[n] = round(sum(a.elapsed_time(b) for a, b in lst if b is not None), 3)
        for h in hooks:
            h.remove()
        out[B] = row
        print(B, json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1])
