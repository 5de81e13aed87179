"""Exact-match accuracy of the shipped testbed DLM: vanilla vs Window-Diffusion (several settings) vs window + parallel decoding.

    vprune eval dlm [--n 32] [--batch 16] [--settings SPECS] [--json out.json]

The testbed (``vprune.testbed.dlm``) writes arithmetic progressions of 64-224 tokens into a
256-token answer; every answer is checked exactly. Prompts in a batch have different lengths and are
left-padded. The first setting is always vanilla (the baseline every other row is compared with, on
the same problems). Each row reports the problems solved out of n with a 95% Wilson interval, the
accuracy relative to vanilla with a 95% paired-bootstrap interval, the paired counts (solved by
vanilla only / by the setting only) with McNemar's exact p, token accuracy, the fraction of answer
tokens equal to the vanilla sampler's, decoded tokens per step, model forwards' computed tokens
relative to vanilla, and wall time.

``--settings`` (comma-separated; default: the preset ``default``):

* ``vanilla`` -- LLaDA's sampler, a full forward every step;
* ``A/W/R`` -- ``WindowDiffusion(active=A, window=W, refresh=R)``; ``W`` may be ``all`` (a window
  covering the whole answer: no far-field);
* a suffix ``@T`` adds confidence-threshold parallel decoding (``vanilla@0.9``, ``16/64/32@0.9``);
* a suffix ``:B`` sets the block length (LLaDA's semi-autoregressive blocks, ``vanilla:32``;
  default ``--block-length``, else the whole answer);
* a preset name: ``default`` (the settings of the README table), ``ablation`` (separates the
  window's error sources: the default ``16/64/32``; far-field only ``16/64/1`` (a refresh every
  step: nothing stale); staleness only ``16/all/32`` (no far-field); decisions confined to the 16
  leftmost masks without staleness ``16/16/1``; left-to-right order only, full context, no window:
  ``vanilla:16`` / ``vanilla:32`` / ``vanilla:64``).

With one token per step the vanilla sampler decodes anywhere in the 256 positions (it writes the
``<eos>`` tail first, right to left), while a window decodes inside its leftmost masks; the
``vanilla:B`` rows show what that order alone does, without any window.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vprune.config import WindowDiffusion


@dataclass(frozen=True)
class Setting:
    """One sampler setting: ``config`` None is the vanilla sampler."""

    name: str
    config: Optional[WindowDiffusion] = None
    threshold: Optional[float] = None  # vanilla's threshold (a window's is in its config)
    block_length: Optional[int] = None  # None: ``--block-length`` (else the whole answer)

    def to_dict(self) -> Dict[str, Any]:
        return dict(setting=self.name, config=None if self.config is None else self.config.to_dict(),
                    threshold=self.threshold, block_length=self.block_length)


SETTINGS = [
    Setting("vanilla"),
    Setting("window 16/64/32 (default)", WindowDiffusion()),
    Setting("window 8/32/16", WindowDiffusion(active=8, window=32, refresh=16)),
    Setting("window 32/128/32", WindowDiffusion(active=32, window=128, refresh=32)),
    Setting("window 16/64/64", WindowDiffusion(active=16, window=64, refresh=64)),
    Setting("vanilla + parallel 0.9", None, 0.9),
    Setting("window + parallel 0.9", WindowDiffusion(threshold=0.9)),
    Setting("window + parallel 0.7", WindowDiffusion(threshold=0.7)),
]

PRESETS = {
    "default": None,  # SETTINGS
    "ablation": "vanilla,16/64/32,16/64/1,16/all/32,16/16/1,vanilla:16,vanilla:32,vanilla:64",
}


def _suffix(s: str, sep: str, convert: Callable[[str], Any], spec: str, what: str, kind: str,
            last: bool) -> Tuple[str, Any]:
    """Split ``s`` at its last (``last``) or first ``sep``: (head, converted tail), or (s, None)."""
    if sep not in s:
        return s, None
    head, _, tail = s.rpartition(sep) if last else s.partition(sep)
    try:
        return head, convert(tail)
    except ValueError:
        raise ValueError(f"setting {spec!r}: {what} {tail!r} is not {kind}") from None


def parse_setting(spec: str, gen_length: int) -> Setting:
    """``vanilla`` | ``A/W/R`` (W may be ``all``), then optionally ``@threshold`` and ``:block_length``."""
    s = spec.strip()
    if not s:
        raise ValueError("empty setting in --settings")
    s, block = _suffix(s, ":", int, spec, "block length", "an int", last=True)
    s, thr = _suffix(s, "@", float, spec, "threshold", "a number", last=False)
    if s in ("vanilla", "v"):
        if thr is not None and not 0.0 < thr <= 1.0:
            raise ValueError(f"setting {spec!r}: threshold={thr} is invalid: allowed a number in (0, 1]")
        return Setting(spec.strip(), None, thr, block)
    parts = s.split("/")
    if len(parts) != 3:
        raise ValueError(f"setting {spec!r} is invalid: allowed 'vanilla' or 'A/W/R' (e.g. 16/64/32), "
                         f"optionally followed by '@threshold' and ':block_length'")
    try:
        a, r = int(parts[0]), int(parts[2])
        w = gen_length if parts[1] == "all" else int(parts[1])
    except ValueError:
        raise ValueError(f"setting {spec!r}: A, W, R must be ints (W may be 'all')") from None
    cfg = WindowDiffusion(active=a, window=w, refresh=r, threshold=thr)  # validates
    return Setting(f"window {spec.strip()}", cfg, None, block)


def parse_settings(text: Optional[str], gen_length: int) -> List[Setting]:
    """``--settings`` -> settings, vanilla (without threshold or blocks) first."""
    if text is None:
        text = "default"
    out: List[Setting] = []
    for tok in text.split(","):
        tok = tok.strip()
        if tok in PRESETS:
            out += list(SETTINGS) if PRESETS[tok] is None else parse_settings(PRESETS[tok], gen_length)
        else:
            out.append(parse_setting(tok, gen_length))
    base = [s for s in out if s.config is None and s.threshold is None and s.block_length is None]
    rest: List[Setting] = []
    for s in out:
        if s not in base and s.name not in [r.name for r in rest]:
            rest.append(s)
    return [base[0] if base else Setting("vanilla")] + rest


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b, c discordant pairs."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m  # exact ints: no float overflow for m > 1023
    return min(1.0, 2 * tail)


def paired_ratio_ci(ok: Sequence[bool], base_ok: Sequence[bool], n_boot: int = 2000,
                    seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of acc(ok) / acc(base_ok), resampling problems (paired bootstrap)."""
    a = torch.tensor(list(ok), dtype=torch.float64)
    b = torch.tensor(list(base_ok), dtype=torch.float64)
    n = a.numel()
    if n == 0 or b.sum() == 0:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    num, den = a[idx].sum(1), b[idx].sum(1)
    r = (num / den)[den > 0]
    q = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return (float(q[0]), float(q[1]))


# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=32, help="problems (default 32)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (left-padded prompts; default 16 on the CPU, 512 on CUDA)")
    p.add_argument("--seed", type=int, default=1234, help="problem seed (training used other draws)")
    p.add_argument("--block-length", type=int, default=None,
                   help="LLaDA block length for settings without ':B' (default: the whole answer)")
    p.add_argument("--settings", default=None,
                   help="comma-separated settings: vanilla | A/W/R (W may be 'all'), optional @threshold and "
                        ":block_length, or a preset (default, ablation); e.g. '16/64/1,16/all/32,16/64/32'")
    p.add_argument("--only", default=None, help="comma-separated indices into the settings to run (default all)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def evaluate(n: int = 32, batch: Optional[int] = None, seed: int = 1234, block_length: Optional[int] = None,
             only: Optional[List[int]] = None, log=print, device: str = "cpu",
             settings: Optional[Sequence[Setting]] = None) -> List[Dict[str, Any]]:
    """Run ``settings`` (default ``SETTINGS``; the first must be plain vanilla) on ``n`` problems.
    ``only``: indices into ``settings`` (vanilla always runs)."""
    from vprune.integrations.llada import diffusion_generate
    from vprune.testbed import dlm

    settings = list(SETTINGS if settings is None else settings)
    if settings[0].config is not None or settings[0].threshold is not None or settings[0].block_length is not None:
        raise ValueError("the first setting must be plain vanilla (the baseline)")
    if batch is None:
        batch = 512 if str(device).startswith("cuda") else 16
    if n < 1 or batch < 1:
        raise ValueError(f"n={n} and batch={batch} must be >= 1")
    model = dlm.load_testbed_dlm(device)
    problems = dlm.make_problems(n, seed)
    g = dlm.GEN_LENGTH
    targets = torch.tensor([p.target(g) for p in problems])
    rows: List[Dict[str, Any]] = []
    base_ok: List[bool] = []
    base_tok = 0
    vanilla_out: Optional[torch.Tensor] = None
    for idx, st_cfg in enumerate(settings):
        if only is not None and idx not in only and idx != 0:
            continue
        bl = st_cfg.block_length if st_cfg.block_length is not None else block_length
        outs: List[torch.Tensor] = []
        steps = computed = 0
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        for s in range(0, n, batch):
            ps = problems[s:s + batch]
            ids, am = dlm.left_pad([p.prompt_ids() for p in ps])
            ids, am = ids.to(device), am.to(device)
            st: Dict[str, Any] = {}
            out = diffusion_generate(model, ids, am, config=st_cfg.config, gen_length=g, steps=g, block_length=bl,
                                     threshold=st_cfg.threshold, stats=st)
            outs.append(out[:, -g:].cpu())
            steps += st["steps"]
            computed += st["computed_tokens"]
        secs = time.time() - t0
        gen = torch.cat(outs)
        ok = [bool(x) for x in (gen == targets).all(1).tolist()]
        if idx == 0:
            base_ok, base_tok, vanilla_out = ok, computed, gen
        correct, base_correct = sum(ok), sum(base_ok)
        acc = correct / n
        base_acc = base_correct / n
        b_only = sum(1 for x, y in zip(ok, base_ok) if y and not x)
        s_only = sum(1 for x, y in zip(ok, base_ok) if x and not y)
        n_batches = -(-n // batch)
        row = dict(st_cfg.to_dict(), block_length=bl, n=n, correct=correct, accuracy=acc,
                   accuracy_ci95=wilson(correct, n),
                   relative_accuracy=acc / base_acc if base_acc else float("nan"),
                   relative_accuracy_ci95=paired_ratio_ci(ok, base_ok) if idx else (1.0, 1.0),
                   vanilla_only=b_only, setting_only=s_only, mcnemar_p=mcnemar_p(b_only, s_only),
                   token_accuracy=float((gen == targets).float().mean()),
                   token_agreement_with_vanilla=float((gen == vanilla_out).float().mean()),
                   tokens_per_step=g * n_batches / steps, computed_tokens_rel=computed / base_tok,
                   seconds=secs, solved=[i for i, x in enumerate(ok) if x])
        rows.append(row)
        lo, hi = row["accuracy_ci95"]
        rlo, rhi = row["relative_accuracy_ci95"]
        log(f"{st_cfg.name:28s} {correct:4d}/{n} = {acc:6.1%} [{lo:5.1%}, {hi:5.1%}]"
            f"  rel {row['relative_accuracy']:6.1%} [{rlo:5.1%}, {rhi:5.1%}]"
            f"  lost/won vs vanilla {b_only}/{s_only} (p {row['mcnemar_p']:.2f})"
            f"  token acc {row['token_accuracy']:6.1%}  same as vanilla {row['token_agreement_with_vanilla']:6.1%}"
            f"  tok/step {row['tokens_per_step']:5.2f}  computed {row['computed_tokens_rel']:6.1%}  {secs:6.1f}s")
    return rows


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    from vprune.testbed import dlm

    settings = parse_settings(args.settings, dlm.GEN_LENGTH)
    if args.batch is None:
        args.batch = 512 if str(args.device).startswith("cuda") else 16
    only = None if args.only is None else [int(x) for x in args.only.split(",")]
    print(f"testbed DLM, {args.n} problems, gen {dlm.GEN_LENGTH}, one token per step unless parallel; "
          f"[95% CI]; rel: accuracy / vanilla's on the same problems [paired bootstrap 95% CI]")
    rows = evaluate(args.n, args.batch, args.seed, args.block_length, only, device=args.device, settings=settings)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(n=args.n, batch=args.batch, seed=args.seed, block_length=args.block_length,
                           settings=args.settings, device=args.device,
                           card=torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
                           torch=torch.__version__, results=rows), f, indent=1)
    return 0
