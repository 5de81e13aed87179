"""Generate with a masked diffusion LM, vanilla vs Window-Diffusion (vprune).

    python examples/dlm_generate.py                         # the shipped testbed DLM, CPU
    python examples/dlm_generate.py --model GSAI-ML/LLaDA-8B-Instruct --prompt "Write a quicksort in Python"

With ``--model`` the model is loaded with ``AutoModel.from_pretrained(..., trust_remote_code=True)``
(bf16 on the GPU when there is one); otherwise the tiny testbed arithmetic DLM shipped with vprune
runs a small batch of left-padded prompts and checks the answers.
"""
import argparse
import time

import torch

import vprune


def testbed(args):
    from vprune.testbed import dlm

    model = dlm.load_testbed_dlm()
    problems = dlm.make_problems(args.batch, seed=7)
    ids, am = dlm.left_pad([p.prompt_ids() for p in problems])
    g = dlm.GEN_LENGTH

    from vprune.integrations.llada import diffusion_generate
    t0 = time.time()
    vanilla = diffusion_generate(model, ids, am, gen_length=g, steps=g)  # the unpatched model
    t_v = time.time() - t0

    vprune.patch(model, vprune.WindowDiffusion(active=16, window=64, refresh=32))
    t0 = time.time()
    windowed = vprune.generate(model, ids, am, gen_length=g, steps=g)
    t_w = time.time() - t0
    print("window stats:", {k: v for k, v in vprune.stats(model).items() if k in ("refreshes", "cheap_steps", "computed_tokens")})
    fast = vprune.generate(model, ids, am, gen_length=g, steps=g, threshold=0.9)  # + parallel decoding
    print("parallel decoding: tokens per step", round(vprune.stats(model)["tokens_per_step"], 2))
    vprune.unpatch(model)

    for name, out in (("vanilla", vanilla), ("window", windowed), ("window+parallel", fast)):
        ok = dlm.exact_match(out[:, -g:], problems)
        print(f"{name:16s} exact match {sum(ok)}/{len(ok)}")
    p = problems[0]
    text = dlm.decode([t for t in windowed[0, -g:].tolist() if t != dlm.EOS_ID])
    print("prompt:", dlm.decode(p.prompt_ids()))
    print("answer:", text[:120], "...")
    print(f"vanilla {t_v:.1f}s, window {t_w:.1f}s (CPU, tiny model: the window pays off on large models)")


def hub_model(args):
    from transformers import AutoModel, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, torch_dtype=dtype).to(dev).eval()
    msgs = [{"role": "user", "content": args.prompt}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    tok.padding_side = "left"
    enc = tok([text] * args.batch, return_tensors="pt", padding=True).to(dev)

    vprune.patch(model, vprune.WindowDiffusion(cuda_graph=dev == "cuda"))
    t0 = time.time()
    out = vprune.generate(model, enc.input_ids, enc.attention_mask, gen_length=args.gen_length,
                          steps=args.gen_length)
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"{time.time() - t0:.1f}s", vprune.stats(model))
    print(tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)[0])
    vprune.unpatch(model)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="hub id or path of a LLaDA model (default: the testbed)")
    ap.add_argument("--prompt", default="Write a quicksort algorithm in Python.")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hub_model(a) if a.model else testbed(a)
