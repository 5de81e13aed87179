"""Answer questions about images with a LLaVA-style VLM, unpruned and with vprune (one added line).

    python examples/vlm_generate.py                      # the shipped testbed VLM (no download)
    python examples/vlm_generate.py --model /path/to/llava-1.5-7b-hf --image cat.png \
        --prompt "USER: <image>\nWhat is in the picture? ASSISTANT:" --keep 64

With ``--model`` any local LLaVA / Qwen2-VL / Qwen2.5-VL checkpoint loads through transformers'
``AutoProcessor`` / ``AutoModelForImageTextToText``; nothing else in the user code changes.
"""
from __future__ import annotations

import argparse
import time

import torch

import vprune


def testbed_demo(keep: float, strategy: str, n: int) -> None:
    from vprune.testbed import load_vlm
    from vprune.testbed.vlm import accuracy, answer
    from vprune.testbed.vqa import make_dataset

    model, tok = load_vlm()
    samples = make_dataset(n, seed=123)
    t0 = time.perf_counter()
    plain = answer(model, tok, samples)
    t_plain = time.perf_counter() - t0

    vprune.patch(model, keep=keep, strategy=strategy)          # the one added line
    t0 = time.perf_counter()
    pruned = answer(model, tok, samples)
    t_pruned = time.perf_counter() - t0
    s = vprune.stats(model)
    vprune.unpatch(model)

    print(f"unpruned: accuracy {accuracy(plain, samples):.3f}  ({t_plain:.2f} s for {n} questions)")
    print(f"{strategy} keep={keep}: accuracy {accuracy(pruned, samples):.3f}  ({t_pruned:.2f} s)")
    print(f"last call: layer {s['layer']}, visual tokens per sample {s['visual_tokens_before'][0]} -> "
          f"{s['visual_tokens_after'][0]}, LLM prefill FLOPs skipped {s['flops_skipped'][0]:.0%}")
    for smp, a, b in list(zip(samples, plain, pruned))[:5]:
        print(f"  Q: {smp.question!r}  truth {smp.answer!r}  unpruned {a!r}  pruned {b!r}")


def real_model(path: str, image: str, prompt: str, keep, strategy: str, max_new_tokens: int) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt").to(device)

    for label in ("unpruned", f"{strategy} keep={keep}"):
        if label != "unpruned":
            vprune.patch(model, keep=keep, strategy=strategy)  # the one added line
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        print(f"[{label}] {dt:.2f} s: {text}")
    print(vprune.stats(model))
    vprune.unpatch(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local path of a LLaVA / Qwen2-VL checkpoint (default: the testbed VLM)")
    p.add_argument("--image", help="image file (with --model)")
    p.add_argument("--prompt", default="USER: <image>\nDescribe the image. ASSISTANT:")
    p.add_argument("--keep", type=float, default=0.25, help="fraction (<= 1) or count (> 1) of visual tokens per image")
    p.add_argument("--strategy", default="fastv", choices=["fastv", "semantic", "divprune", "random"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("-n", type=int, default=64, help="testbed questions")
    a = p.parse_args()
    keep = a.keep if a.keep <= 1 else int(a.keep)
    if a.model:
        if not a.image:
            p.error("--model needs --image")
        real_model(a.model, a.image, a.prompt, keep, a.strategy, a.max_new_tokens)
    else:
        testbed_demo(keep, a.strategy, a.n)


if __name__ == "__main__":
    main()
