"""Where a LLaVA-7B-shaped batch-8 prefill waits: host syncs (in order, by layer) and GPU idle time.

    python3 -m vprune.bench.vlm_prefill_trace        # GPU; about 30 s

Builds the ``vprune bench vlm`` model (random bf16 weights), runs one prefill of 8 prompts
unpatched and then patched (fastv, keep 64 of 576, K=2), and prints, for each, the host syncs
torch's sync debug mode reports (tagged with the vision tower / decoder layer running at the time),
the GPU busy time and wall time of one profiled call, and the GPU idle gaps over 0.3 ms. Idle time
that shows in no gap is spread between kernels: the host launches them slower than the GPU runs
them.
"""
import json
import time
import warnings

import torch

import vprune
from vprune.bench.vlm import LLAVA_7B, build_llava, llava_inputs, text_model_of

dev = torch.device("cuda")
model, n_img = build_llava(LLAVA_7B, dev, torch.bfloat16)
inp = llava_inputs(LLAVA_7B, 8, 64, dev, torch.bfloat16)
layers = text_model_of(model).layers
vision_layers = [m for n, m in model.named_modules() if n.endswith("encoder.layers.0")][:1]

def run():
    with torch.no_grad():
        return model(**inp, use_cache=True, logits_to_keep=1)

def analyse(tag):
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    # 1. syncs in order, with markers
    marks = [l.register_forward_pre_hook(lambda m, a, i=i: warnings.warn(f"@L{i}")) for i, l in enumerate(layers)]
    if len(vision_layers):
        marks.append(vision_layers[0].register_forward_pre_hook(lambda m, a: warnings.warn("@VISION")))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        run()
        torch.cuda.set_sync_debug_mode(0)
    for h in marks:
        h.remove()
    where, out = "start", []
    for w in rec:
        msg = str(w.message)
        if msg.startswith("@"):
            where = msg[1:]
        elif "synchroniz" in msg.lower():
            out.append(f"{where}: {w.filename.split('site-packages/')[-1]}:{w.lineno}")
    print(f"[{tag}] {len(out)} syncs:"); [print("   ", o) for o in out]
    # 2. GPU gaps from a profiler trace
    from torch.profiler import profile, ProfilerActivity
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter(); run(); torch.cuda.synchronize(); wall = time.perf_counter() - t0
    prof.export_chrome_trace(f"/tmp/{tag}.json")
    ev = json.load(open(f"/tmp/{tag}.json"))["traceEvents"]
    k = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    cpu = [e for e in ev if e.get("cat") == "cuda_runtime" and "ynchronize" in e.get("name", "") or (e.get("cat") == "cuda_runtime" and "Memcpy" in e.get("name", ""))]
    start = min(e["ts"] for e in ev if "ts" in e and e.get("ph") == "X")
    busy, gaps, end = 0.0, [], k[0][0]
    for a, b in k:
        if a > end + 300:
            gaps.append((a - end, end - start))
        busy += max(0, b - max(a, end)); end = max(end, b)
    print(f"[{tag}] wall {wall*1e3:.1f} ms (profiled), GPU busy {busy/1e3:.1f} ms, first kernel at {(k[0][0]-start)/1e3:.1f} ms, last end {(end-start)/1e3:.1f} ms")
    for g, at in sorted(gaps, reverse=True)[:8]:
        print(f"    gap {g/1e3:6.2f} ms at {at/1e3:6.1f} ms")
    for e in sorted(cpu, key=lambda e: e["ts"])[:30]:
        print(f"    cpu {e['name']} at {(e['ts']-start)/1e3:6.1f} ms for {e.get('dur',0)/1e3:.2f} ms")

analyse("unpatched")
vprune.patch(model, vprune.VisualPruning(keep=64, layer=2, strategy="fastv"))
analyse("patched")
