"""Train the testbed robot policy by behaviour cloning from the scripted expert (seeded, CPU).

    python -m vprune.testbed.train_policy                 # writes vla_policy.safetensors + config
    python -m vprune.testbed.train_policy --steps 300 --out /tmp/p   # a quick run elsewhere

The shipped weights come from one seeded run on an H100 (350 s, 100% unpruned closed-loop success on
seeds 0..29; results/policy_train_h100_2026-11-27.log):

    python -m vprune.testbed.train_policy --device cuda --episodes 1800 --steps 7000 --batch 64 \
        --lr 2e-3 --seed 0 --eval-episodes 30

Data: expert rollouts in ``sim.PickEnv`` with noise injection (DART-style: with probability
``--noise`` the executed action is random, the label stays the expert's), so the policy sees and
learns to recover from off-trajectory states; plus states sampled close to the target, where the
close decision is made. Training seeds start at 100000, disjoint from the evaluation seeds (0..).

Loss: cross-entropy on the action tokens (teacher forcing on [BOS, patches, prompt, actions]) plus,
during training only, an auxiliary loss on the last prompt token's hidden state (which patch holds the
target, which the gripper, and their coordinates) through a linear head that is not shipped: it makes
the LLM learn to look at the right visual tokens within a CPU budget of minutes. AdamW, linear warm-up then cosine decay. Single-threaded by default (``--threads``), deterministic
given ``--seed``. At the end it reports closed-loop success on ``--eval-episodes`` seeded episodes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .policy import TestbedVLAConfig, TestbedVLAPolicy
from .sim import ACTION_DIM, PickEnv
from .tokenizer import (ActionTokenizer, N_WORDS, TestbedProcessor, TestbedTokenizer, build_vocab,
                        image_to_pixel_values, prompt_for)

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_SEED_OFFSET = 100_000


def collect(n_episodes: int, noise: float, near: int, seed: int) -> Tuple[np.ndarray, List[str], np.ndarray, np.ndarray]:
    """Frames uint8 [N, H, W, 3], instructions [N], expert actions float32 [N, 3] and the
    positions (target x, y, gripper x, y) int [N, 4] used by the auxiliary training losses."""
    rng = np.random.default_rng(seed)
    frames, texts, actions, where = [], [], [], []

    def pos(env: PickEnv) -> List[int]:
        t = env.objects[env.target]
        return [t.x, t.y, int(env.gripper[0]), int(env.gripper[1])]

    env = PickEnv()
    for ep in range(n_episodes):
        obs = env.reset(TRAIN_SEED_OFFSET + seed * 1_000_000 + ep)
        while not env.done:
            a = env.expert_action()
            frames.append(obs["image"]); texts.append(obs["instruction"]); actions.append(a)
            where.append(pos(env))
            if rng.random() < noise:
                exec_a = np.array([*rng.integers(-2, 3, size=2) / 2.0, -1.0], dtype=np.float32)
            else:
                exec_a = a
            obs, _, _, _ = env.step(exec_a)
        # states next to the target: where the close decision is learned
        env.reset(TRAIN_SEED_OFFSET + seed * 1_000_000 + ep)
        t = env.objects[env.target]
        for _ in range(near):
            off = rng.integers(-4, 5, size=2)
            env.gripper = np.clip(np.array([t.x, t.y]) + off, 0, env.size - 1).astype(np.int64)
            frames.append(env.render()); texts.append(env.instruction); actions.append(env.expert_action())
            where.append(pos(env))
    return np.stack(frames), texts, np.stack(actions).astype(np.float32), np.asarray(where, dtype=np.int64)


def patch_classes(frames: np.ndarray, patch: int, chunk: int = 1000) -> np.ndarray:
    """Per-patch class of each frame, int64 [N, (H/patch)^2]: 0 table, 1..5 the object colours (in
    ``COLORS`` order), 6 the gripper -- the class covering most of the patch's non-table pixels."""
    from .sim import COLORS, GRIPPER_COLOR

    palette = np.array(list(COLORS.values()) + [GRIPPER_COLOR], dtype=np.int16)  # [6, 3]
    out = []
    for i in range(0, len(frames), chunk):
        f = frames[i:i + chunk].astype(np.int16)
        n, h, w, _ = f.shape
        diff = np.abs(f[:, :, :, None, :] - palette[None, None, None]).max(-1)  # [n, h, w, 6]
        cls = np.where(diff.min(-1) <= 12, diff.argmin(-1) + 1, 0)
        g = h // patch
        cls = cls.reshape(n, g, patch, g, patch).transpose(0, 1, 3, 2, 4).reshape(n, g * g, patch * patch)
        counts = np.stack([(cls == c).sum(-1) for c in range(1, 8)], -1)  # [n, g*g, 7]
        best = counts.argmax(-1) + 1
        out.append(np.where(counts.max(-1) >= 4, best, 0))
    return np.concatenate(out).astype(np.int64)


def init_sincos_pos_embed(vit: torch.nn.Module) -> None:
    """Start the ViT's learned position embedding from a 2D sin-cos table (row and column halves),
    which makes patch coordinates linearly readable from the first step; it stays trainable."""
    pe = vit.pos_embed
    n, d = pe.shape[1], pe.shape[2]
    side = int(round(n ** 0.5))
    assert side * side == n and d % 4 == 0
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32),
                                torch.arange(side, dtype=torch.float32), indexing="ij")
    freqs = 1.0 / (100.0 ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4)))

    def enc(pos: torch.Tensor) -> torch.Tensor:
        ang = pos.reshape(-1, 1) * freqs[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    table = torch.cat([enc(rows), enc(cols)], dim=1)  # [n, d]
    with torch.no_grad():
        pe.copy_(0.5 * table[None])


def norm_stats_from(actions: np.ndarray) -> Dict[str, Any]:
    q01 = np.quantile(actions, 0.01, axis=0).round(6).tolist()
    q99 = np.quantile(actions, 0.99, axis=0).round(6).tolist()
    return {"pick2d": {"action": {"q01": q01, "q99": q99, "mask": [True, True, False],
                                  "mean": actions.mean(0).round(6).tolist(),
                                  "std": actions.std(0).round(6).tolist()}}}


def normalize(actions: np.ndarray, stats: Dict[str, Any]) -> np.ndarray:
    s = stats["pick2d"]["action"]
    lo, hi, mask = np.asarray(s["q01"]), np.asarray(s["q99"]), np.asarray(s["mask"], dtype=bool)
    scaled = 2.0 * (actions - lo) / np.maximum(hi - lo, 1e-8) - 1.0
    return np.clip(np.where(mask, scaled, actions), -1.0, 1.0)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=900)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--near", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--aux", type=float, default=0.5, help="weight of the auxiliary where-is-what loss")
    p.add_argument("--aux-patch", type=float, default=0.5, help="weight of the per-patch content loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from these weights (safetensors) instead of scratch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-episodes", type=int, default=30)
    p.add_argument("--out", default=HERE)
    p.add_argument("--device", default="cpu", help="cpu or cuda (data and sampling stay on the CPU generator)")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.time()

    frames, texts, actions, where = collect(args.episodes, args.noise, args.near, args.seed)
    stats = norm_stats_from(actions)
    tok = TestbedTokenizer(build_vocab())
    prompts = sorted(set(texts))
    prompt_ids = {t: tok.encode(prompt_for(t)) for t in prompts}
    lengths = {len(v) for v in prompt_ids.values()}
    assert len(lengths) == 1, f"prompts of unequal length {lengths}"
    ids_all = torch.tensor([prompt_ids[t] for t in texts], dtype=torch.long)
    config = TestbedVLAConfig(norm_stats=stats)
    atok = ActionTokenizer(config.text_config.vocab_size, config.n_action_bins)
    act_ids = torch.from_numpy(atok.encode(normalize(actions, stats)))
    pix_all = torch.from_numpy(frames)  # uint8, converted per batch
    n = len(texts)
    print(f"data: {n} samples from {args.episodes} episodes ({time.time() - t_start:.0f}s)", flush=True)

    model = TestbedVLAPolicy(config)
    init_sincos_pos_embed(model.vision_backbone.featurizer)
    if args.init:  # continue from earlier weights (e.g. a shorter run)
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.init))
        print(f"init from {args.init}", flush=True)
    model.to(device).train()
    # auxiliary head (training only, not shipped): from the last prompt token's final hidden state,
    # which patch holds the target and which the gripper, and their pixel coordinates
    hidden_size = config.text_config.hidden_size
    grid = config.image_size // config.patch_size
    aux = torch.nn.Linear(hidden_size, 2 * grid * grid + 4).to(device)
    where_t = torch.from_numpy(where)
    # dense auxiliary labels: what each patch shows (training only, through a linear head on the
    # projector output that is not shipped)
    pcls = torch.from_numpy(patch_classes(frames, config.patch_size))
    aux_patch = torch.nn.Linear(hidden_size, 7).to(device)
    patch_of = lambda x, y: (y // config.patch_size) * grid + (x // config.patch_size)  # noqa: E731
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n_, p in model.named_parameters() if p.ndim >= 2] + [aux.weight, aux_patch.weight]
    no_decay = [p for n_, p in model.named_parameters() if p.ndim < 2] + [aux.bias, aux_patch.bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(args.seed)
    lm = model.language_model
    ema = None
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        pix = image_to_pixel_values(list(pix_all[idx].numpy())).to(device)
        target = act_ids[idx].to(device)
        ids = torch.cat([ids_all[idx].to(device), target], dim=1)
        emb, _, _, projected = model.embed_multimodal(ids, pix)
        hidden = lm.model(inputs_embeds=emb, use_cache=False).last_hidden_state
        # positions whose next token is an action token
        pos = hidden[:, -ACTION_DIM - 1:-1]
        logits = lm.lm_head(pos)
        act_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        loss = act_loss
        if args.aux > 0:
            w = where_t[idx].to(device)
            a_out = aux(hidden[:, -ACTION_DIM - 1])
            g2 = grid * grid
            aux_loss = (F.cross_entropy(a_out[:, :g2], patch_of(w[:, 0], w[:, 1]))
                        + F.cross_entropy(a_out[:, g2:2 * g2], patch_of(w[:, 2], w[:, 3]))
                        + F.mse_loss(a_out[:, 2 * g2:], w.float() / config.image_size * 2 - 1) * 4)
            loss = loss + args.aux * aux_loss
        if args.aux_patch > 0:
            pl = aux_patch(projected)
            loss = loss + args.aux_patch * F.cross_entropy(pl.reshape(-1, 7), pcls[idx].to(device).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters())
                                       + list(aux_patch.parameters()), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean().item()
        ema = (act_loss.item(), acc) if ema is None else (0.98 * ema[0] + 0.02 * act_loss.item(), 0.98 * ema[1] + 0.02 * acc)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} action-loss {ema[0]:.4f} total {loss.item():.3f} token-acc {ema[1]:.3f} lr {sched.get_last_lr()[0]:.2e} "
                  f"({time.time() - t_start:.0f}s)", flush=True)

    model.to("cpu").eval()
    os.makedirs(args.out, exist_ok=True)
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "vla_policy.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    keep = ["image_size", "patch_size", "vision_dim", "vision_depth", "vision_heads",
            "use_fused_vision_backbone", "text_config", "n_action_bins", "norm_stats", "pad_to_multiple_of",
            "pad_token_id", "bos_token_id"]
    tc = cfg["text_config"]
    tkeep = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
             "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id"]
    tc = {k: (tc.get(k) if k != "rope_theta" else (tc.get("rope_theta") or tc.get("rope_parameters", {}).get("rope_theta")))
          for k in tkeep}
    cfg = {k: cfg[k] for k in keep}
    cfg["text_config"] = tc
    cfg["training"] = {k: getattr(args, k) for k in ("episodes", "noise", "near", "steps", "batch", "lr", "aux", "aux_patch", "seed", "init")}
    with open(os.path.join(args.out, "vla_policy_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tok.save(os.path.join(args.out, "vocab.json"))
    print(f"saved to {args.out} ({time.time() - t_start:.0f}s)", flush=True)

    if args.eval_episodes > 0:
        from .policy_rollout import rollout
        processor = TestbedProcessor(tok)
        res = rollout(model, processor, range(args.eval_episodes), batch=10)
        print(f"closed-loop success (unpruned, seeds 0..{args.eval_episodes - 1}): "
              f"{res['success_rate'] * 100:.1f}% ({time.time() - t_start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
