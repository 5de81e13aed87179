"""Per-image time of NATCache modes vs vanilla on an aMUSEd-256-shaped UVit2DModel (GPU).

    vprune bench nat [--quick | --tiny] [--batches 1,8,32] [--configs cache:4,reuse:4,...] [--json out.json]

Builds diffusers' ``UVit2DModel`` with the released aMUSEd-256 shapes (22 blocks, width 1024,
16x16 = 256 tokens, codebook 8192) and random fp16 weights on the GPU, and runs the
``AmusedPipeline`` denoising loop (``AmusedScheduler``, cosine schedule, ``--steps`` 12) without text
encoder and VQ decoder (random text embeddings, 77 tokens). Per batch size it times:

* ``vanilla-eager``: the unpatched transformer, eager PyTorch;
* ``vanilla-graph``: the unpatched transformer replayed from one captured CUDA graph per shape;
* ``<mode>:<refresh>``: ``vprune.patch(model, NATCache(mode, refresh, cuda_graphs=True))`` (one
  graph per step size; captured during the untimed warm-up generation), and with ``--eager-modes``
  the same patches eagerly.

Every setting runs one untimed warm-up generation (captures graphs) and ``--repeats`` timed ones
(graph settings then rerun the first timed generation eagerly: ``graph_matches_eager`` is the
fraction of equal tokens: about 1.0 when replays run the same kernels as eager; a low value means
broken graph bookkeeping);
the table shows ms per image (= generation time / batch) and speedups vs vanilla-graph and
vanilla-eager, the fraction of token rows computed (``tokens``: modes cache and reuse run every
per-token module on those rows, disentangle only the transformer layers) and the fraction of the
per-token multiply-accumulates that implies (``work``, from :func:`token_macs`). Random weights say nothing about quality (``vprune eval nat`` measures that on the
testbed); they do not change the work per step, which the schedule fixes. Needs CUDA and diffusers
(``pip install vprune[diffusers]``); ``--tiny`` runs a tiny shape eagerly on the CPU (smoke test).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from typing import Any, Dict, Iterator, List, Tuple

import torch

DEFAULT_CONFIGS = "cache:4,cache:12,disentangle:12,reuse:3,reuse:4"
TINY_SHAPE = dict(hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                  encoder_hidden_size=16, vocab_size=40, codebook_size=32, in_channels=16, block_out_channels=16,
                  num_res_blocks=1, block_num_heads=2, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=64, sample_size=8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="batches 8 and 32, configs cache:12 and reuse:4, 2 repeats")
    p.add_argument("--tiny", action="store_true", help="tiny shape, eager, on CPU (smoke test, no GPU needed)")
    p.add_argument("--batches", default=None, help="comma-separated images per generation (default 1,8,32)")
    p.add_argument("--configs", default=None, help=f"mode:refresh list (default {DEFAULT_CONFIGS})")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance scale; > 1 doubles the transformer batch (default 0: off)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per setting (default 3)")
    p.add_argument("--eager-modes", action="store_true", help="also time each NATCache config without CUDA graphs")
    p.add_argument("--json", default="bench_nat.json", help="output JSON (default bench_nat.json)")


def token_macs(cfg: Dict[str, Any], text_tokens: int = 77) -> Dict[str, float]:
    """Multiply-accumulates per image token of one ``UVit2DModel`` forward, by part.

    ``stack``: the transformer layers (self-attention over all ``N`` keys, cross-attention over
    ``text_tokens``, GEGLU feed-forward); ``rows``: the other per-token work (embedding, ConvNeXt
    pointwise MLPs, down/up block attention, projections, MLM head); ``mixing``: the depthwise 3x3
    convolutions, which NATCache still runs over the full map. Text-side K/V (once per generation)
    and per-image conditioning are left out.
    """
    h, c, n = cfg["hidden_size"], cfg["block_out_channels"], cfg["sample_size"] ** 2
    i, r = cfg["intermediate_size"], cfg["num_res_blocks"]
    layer = 4 * h * h + 2 * n * h + 2 * h * h + 2 * text_tokens * h + 2 * h * i + i * h
    block = 4 * c * c + 4 * c * c + 2 * (2 * c * c + 2 * text_tokens * c)    # ConvNeXt MLP + 2 attentions
    rows = (cfg["in_channels"] * c + 2 * r * block + 2 * c * h
            + c * cfg["in_channels"] + cfg["in_channels"] * cfg["codebook_size"])
    return {"stack": float(cfg["num_hidden_layers"] * layer), "rows": float(rows), "mixing": float(2 * r * 9 * c)}


def work_fraction(cfg: Dict[str, Any], tokens_per_step: List[int], scope: str) -> float:
    """Fraction of the per-token MACs of ``len(tokens_per_step)`` vanilla forwards that NATCache
    computes, given the rows ``k`` it computed per step (``scope`` "forward": every per-token
    module runs on ``k`` rows; "blocks": only the transformer layers do)."""
    m, n = token_macs(cfg), cfg["sample_size"] ** 2
    total = m["stack"] + m["rows"] + m["mixing"]
    short = m["stack"] + m["rows"] if scope == "forward" else m["stack"]
    done = sum(k * short + n * (total - short) for k in tokens_per_step)
    return done / (len(tokens_per_step) * n * total)


def _parse_configs(text: str) -> List[Tuple[str, int]]:
    out = []
    for item in text.split(","):
        mode, _, refresh = item.strip().partition(":")
        out.append((mode, int(refresh or 4)))
    return out


class GraphedForward:
    """The unpatched model replayed from one CUDA graph per input signature (the fair baseline)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graphs: Dict[Any, Any] = {}
        self.pool = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from vprune.nat import _clone, _signature
        from vprune.nested import copy_into

        key = _signature(args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            out = self.model(*args, **kwargs)
            static_args, static_kwargs = _clone(args), _clone(kwargs)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(g, pool=self.pool):
                static_out = self.model(*static_args, **static_kwargs)
            self.graphs[key] = (g, static_args, static_kwargs, static_out)
            return out
        g, static_args, static_kwargs, static_out = entry
        copy_into(static_args, args)
        copy_into(static_kwargs, kwargs)
        g.replay()
        return static_out.clone()


class _Switchable:
    """Calls ``graphed`` except inside ``with self.eager():`` (then ``eager``)."""

    def __init__(self, graphed: Any, eager: Any) -> None:
        self.graphed, self.eager_fn, self.use_eager = graphed, eager, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.eager_fn if self.use_eager else self.graphed)(*args, **kwargs)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        self.use_eager = True
        try:
            yield
        finally:
            self.use_eager = False


def _eager_switch(runtime: Any) -> Any:
    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        runtime.cuda_graphs = False
        try:
            yield
        finally:
            runtime.cuda_graphs = True
    return ctx


def _inputs(batch: int, cfg: Dict[str, Any], guidance: float, device: str, dtype: torch.dtype):
    b = 2 * batch if guidance > 1.0 else batch
    g = torch.Generator(device="cpu").manual_seed(0)
    ehs = torch.randn(b, 77, cfg["encoder_hidden_size"], generator=g).to(device, dtype)
    pooled = torch.randn(b, cfg["cond_embed_dim"], generator=g).to(device, dtype)
    mc = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]]).expand(b, 5).to(device, dtype)
    return ehs, pooled, mc


def _time_generation(fn: Any, batch: int, cfg: Dict[str, Any], args: argparse.Namespace, device: str,
                     dtype: torch.dtype, scheduler: Any, verify: Any = None) -> Dict[str, Any]:
    from vprune.integrations.amused import amused_generate

    ehs, pooled, mc = _inputs(batch, cfg, args.guidance, device, dtype)

    def once(seed: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed)
        return amused_generate(fn, scheduler, ehs, pooled, mc, batch=batch, grid=cfg["sample_size"],
                               steps=args.steps, guidance=args.guidance, generator=gen)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    once(0)
    sync()
    warm = time.perf_counter() - t0
    times = []
    for r in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        toks = once(r + 1)
        sync()
        times.append(time.perf_counter() - t0)
        if r == 0:
            first = toks
    best = min(times)
    out = {"warmup_s": warm, "gen_ms": [t * 1e3 for t in times], "ms_per_image": best * 1e3 / batch}
    if verify is not None and args.repeats > 0:
        # the same generation (seed 1) eagerly: replayed graphs must give the same tokens
        with verify():
            ref = once(1)
        out["graph_matches_eager"] = float((ref == first).float().mean())
    return out


def run(args: argparse.Namespace) -> int:
    try:
        import diffusers
        from diffusers import AmusedScheduler, UVit2DModel
    except ImportError:
        print("vprune bench nat needs diffusers: pip install 'vprune[diffusers]'", file=sys.stderr)
        return 2
    import vprune
    from vprune.integrations.amused import amused_256_config

    if args.tiny:
        device, dtype, cfg = "cpu", torch.float32, dict(TINY_SHAPE)
        torch.set_num_threads(1)
        batches = [int(b) for b in (args.batches or "1,2").split(",")]
        configs = _parse_configs(args.configs or "cache:4,reuse:3,disentangle:12")
        use_graphs = False
        args.repeats = min(args.repeats, 1)
        args.steps = min(args.steps, 6)
    else:
        if not torch.cuda.is_available():
            print("vprune bench nat needs a CUDA GPU (use --tiny for a CPU smoke run)", file=sys.stderr)
            return 2
        device, dtype, cfg = "cuda", torch.float16, amused_256_config()
        if args.quick:
            batches = [int(b) for b in (args.batches or "8,32").split(",")]
            configs = _parse_configs(args.configs or "cache:12,reuse:4")
            args.repeats = min(args.repeats, 2)
        else:
            batches = [int(b) for b in (args.batches or "1,8,32").split(",")]
            configs = _parse_configs(args.configs or DEFAULT_CONFIGS)
        use_graphs = True

    torch.manual_seed(0)
    model = UVit2DModel(**cfg).to(device=device, dtype=dtype).eval()
    scheduler = AmusedScheduler(mask_token_id=cfg["vocab_size"] - 1)
    rows: List[Dict[str, Any]] = []
    with torch.inference_mode():
        for b in batches:
            settings: List[Tuple[str, Any, Any]] = [("vanilla-eager", None, False)]
            if use_graphs:
                settings.append(("vanilla-graph", None, True))
            for mode, refresh in configs:
                if use_graphs:
                    settings.append((f"{mode}:{refresh}", vprune.NATCache(mode=mode, refresh=refresh, cuda_graphs=True), True))
                if args.eager_modes or not use_graphs:
                    settings.append((f"{mode}:{refresh} eager", vprune.NATCache(mode=mode, refresh=refresh), False))
            for name, nat_cfg, graphs in settings:
                row: Dict[str, Any] = {"batch": b, "setting": name}
                try:
                    verify = None
                    if nat_cfg is not None:
                        vprune.patch(model, nat_cfg)
                        fn = model
                        if graphs:
                            verify = _eager_switch(model._vprune.runtime)
                    else:
                        fn = GraphedForward(model) if graphs else model
                        if graphs:
                            fn = _Switchable(fn, model)
                            verify = fn.eager
                    row.update(_time_generation(fn, b, cfg, args, device, dtype, scheduler, verify))
                    if nat_cfg is not None:
                        st = vprune.stats(model)
                        row["tokens_computed_fraction"] = st["tokens_computed_fraction"]
                        row["graphs_captured"] = st["graphs_captured"]
                        hist = model._vprune.runtime.history
                        row["tokens_per_step"] = [h["k"] for h in hist[-args.steps:]]
                        row["tokens_computed_scope"] = st["tokens_computed_scope"]
                        row["work_fraction"] = work_fraction(cfg, row["tokens_per_step"], st["tokens_computed_scope"])
                except Exception as exc:  # one failing setting must not hide the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    if vprune.is_patched(model):
                        vprune.unpatch(model)
                    fn = None
                    if device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)

    for b in batches:
        base = {r["setting"]: r.get("ms_per_image") for r in rows if r["batch"] == b}
        for r in rows:
            if r["batch"] != b or "ms_per_image" not in r:
                continue
            if base.get("vanilla-graph"):
                r["speedup_vs_vanilla_graph"] = base["vanilla-graph"] / r["ms_per_image"]
            if base.get("vanilla-eager"):
                r["speedup_vs_vanilla_eager"] = base["vanilla-eager"] / r["ms_per_image"]

    print(f"\n{'batch':>5} {'setting':<22} {'ms/image':>9} {'vs graph':>9} {'vs eager':>9} {'tokens':>7} "
          f"{'work':>6} {'graph==eager':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:>5} {r['setting']:<22} ERROR {r['error']}")
            continue
        fmt = lambda v, s="x": f"{v:.2f}{s}" if isinstance(v, float) else "-"  # noqa: E731
        print(f"{r['batch']:>5} {r['setting']:<22} {r['ms_per_image']:>9.2f} {fmt(r.get('speedup_vs_vanilla_graph')):>9} "
              f"{fmt(r.get('speedup_vs_vanilla_eager')):>9} {fmt(r.get('tokens_computed_fraction'), ''):>7} "
              f"{fmt(r.get('work_fraction'), ''):>6} {fmt(r.get('graph_matches_eager'), ''):>8}")
    print("tokens: rows computed / rows of vanilla (cache, reuse: every per-token module; disentangle: the "
          "transformer layers only); work: the per-token MACs computed (bench.nat.token_macs)")

    report = {
        "benchmark": "nat", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "vprune": vprune.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "shape": cfg, "dtype": str(dtype), "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
        "note": "random weights; per-image time = best generation time / batch; transformer + AmusedScheduler loop "
                "only (no text encoder, no VQ decoder)",
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1
