"""A tiny trained class-conditional MaskGIT over a fixed glyph codebook (testbed for ``NATCache``).

Everything here is deterministic and offline:

* images: 32x32, 4-colour palette (black background), one shape per image from 10 classes (disc,
  square, triangle, plus, ring, diamond, cross, ell, tee, frame) at random position/size/colour;
* tokenizer: each 4x4 patch becomes one of 46 tokens = "empty" or (colour in 3) x (glyph in 15),
  the glyph being the nearest (Hamming) of 15 fixed 4x4 binary patterns; 8x8 = 64 tokens per image;
  the mask token id is 46 (= codebook size);
* model: token + position + class embeddings (class added to every token; class 10 = "no class"
  for classifier-free guidance) -> ``depth`` timm ``Block``s -> LayerNorm -> linear head ``[B, 64, 46]``.
  Trained with the cosine mask schedule (``train_maskgit.py``), half the batches under ENAT's
  visible/mask attention pattern so that ``NATCache(mode="disentangle")`` is in distribution;
* sampler: MaskGIT/aMUSEd-style (multinomial sampling, confidence + annealed Gumbel noise, cosine
  reveal schedule, revealed tokens never re-masked), classifier-free guidance as one concatenated
  batch or as two separate passes;
* quality metric: accuracy of a small classifier (trained on real token grids) on generated samples
  w.r.t. the requested class, and the Frechet distance between the classifier's hidden features of
  generated samples and of held-out real samples (lower is better).

Weights: ``maskgit_testbed.safetensors`` next to this file (model + classifier), made by
``python -m vprune.testbed.train_maskgit``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMG = 32
PATCH = 4
GRID = IMG // PATCH
N_TOKENS = GRID * GRID
PALETTE = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 110, 240]], dtype=np.uint8)
CLASSES = ("disc", "square", "triangle", "plus", "ring", "diamond", "cross", "ell", "tee", "frame")
NUM_CLASSES = len(CLASSES)
N_COLORS = 3
N_GLYPHS = 16
CODEBOOK_SIZE = 1 + N_COLORS * (N_GLYPHS - 1)   # 46
MASK_ID = CODEBOOK_SIZE
WEIGHTS = os.path.join(os.path.dirname(__file__), "maskgit_testbed.safetensors")


def _glyphs() -> np.ndarray:
    g = np.zeros((N_GLYPHS, 4, 4), dtype=bool)
    i, j = np.mgrid[0:4, 0:4]
    g[1] = True
    g[2] = j < 2
    g[3] = j >= 2
    g[4] = i < 2
    g[5] = i >= 2
    g[6] = (i < 2) & (j < 2)
    g[7] = (i < 2) & (j >= 2)
    g[8] = (i >= 2) & (j < 2)
    g[9] = (i >= 2) & (j >= 2)
    g[10] = i >= j
    g[11] = i + j >= 3
    g[12] = i + j <= 3
    g[13] = i <= j
    g[14] = (i >= 1) & (i <= 2) & (j >= 1) & (j <= 2)
    g[15] = (j >= 1) & (j <= 2)
    return g


GLYPHS = _glyphs()


# ----------------------------------------------------------------------------- data

def render(cls: int, rng: np.random.Generator) -> np.ndarray:
    """One ``[32, 32]`` uint8 palette-index image of class ``cls``."""
    yy, xx = np.mgrid[0:IMG, 0:IMG] + 0.5
    r = rng.uniform(7.0, 11.5)
    cx, cy = rng.uniform(16 - (15 - r), 16 + (15 - r), size=2)
    t = max(2.5, 0.35 * r)
    dx, dy = xx - cx, yy - cy
    adx, ady = np.abs(dx), np.abs(dy)
    dist = np.sqrt(dx * dx + dy * dy)
    if cls == 0:
        m = dist <= r
    elif cls == 1:
        m = np.maximum(adx, ady) <= 0.85 * r
    elif cls == 2:
        m = (adx <= (dy + r) * 0.55) & (dy <= 0.8 * r)
    elif cls == 3:
        m = ((adx <= t / 2) & (ady <= r)) | ((ady <= t / 2) & (adx <= r))
    elif cls == 4:
        m = (dist <= r) & (dist >= r - t)
    elif cls == 5:
        m = adx + ady <= r
    elif cls == 6:
        m = ((np.abs(dx - dy) <= 0.75 * t) | (np.abs(dx + dy) <= 0.75 * t)) & (np.maximum(adx, ady) <= 0.8 * r)
    elif cls == 7:
        m = ((dx >= -r) & (dx <= -r + t) & (ady <= r)) | ((dy >= r - t) & (dy <= r) & (dx >= -r) & (dx <= r))
    elif cls == 8:
        m = ((dy >= -r) & (dy <= -r + t) & (adx <= r)) | ((adx <= t / 2) & (ady <= r))
    elif cls == 9:
        c = np.maximum(adx, ady)
        m = (c <= 0.9 * r) & (c >= 0.9 * r - t)
    else:
        raise ValueError(f"cls={cls} is invalid: allowed an int in [0, {NUM_CLASSES - 1}]")
    color = int(rng.integers(1, N_COLORS + 1))
    return (m.astype(np.uint8) * color)


def make_dataset(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images ``[n, 32, 32]`` uint8 and labels ``[n]`` (classes balanced, order shuffled)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    images = np.stack([render(int(c), rng) for c in labels])
    return images, labels.astype(np.int64)


def encode(images: np.ndarray) -> np.ndarray:
    """Palette images ``[n, 32, 32]`` -> tokens ``[n, 64]`` int64 (deterministic, nearest glyph)."""
    n = images.shape[0]
    p = images.reshape(n, GRID, PATCH, GRID, PATCH).transpose(0, 1, 3, 2, 4).reshape(n, N_TOKENS, PATCH * PATCH)
    counts = np.stack([(p == c).sum(-1) for c in range(1, N_COLORS + 1)], -1)     # [n, 64, 3]
    fg = counts.argmax(-1) + 1
    fg_mask = p == fg[..., None]                                                    # [n, 64, 16]
    glyphs = GLYPHS.reshape(N_GLYPHS, -1)
    ham = (fg_mask[:, :, None, :] != glyphs[None, None]).sum(-1)                   # [n, 64, 16]
    pat = ham.argmin(-1)
    tok = np.where(pat == 0, 0, 1 + (fg - 1) * (N_GLYPHS - 1) + (pat - 1))
    return tok.astype(np.int64)


def decode(tokens: np.ndarray) -> np.ndarray:
    """Tokens ``[n, 64]`` -> palette images ``[n, 32, 32]`` uint8 (mask tokens render grey-free empty)."""
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    t = np.where(tokens >= CODEBOOK_SIZE, 0, tokens)
    color = np.where(t == 0, 0, (t - 1) // (N_GLYPHS - 1) + 1)
    pat = np.where(t == 0, 0, (t - 1) % (N_GLYPHS - 1) + 1)
    patches = GLYPHS[pat].astype(np.uint8) * color[..., None, None].astype(np.uint8)  # [n, 64, 4, 4]
    return patches.reshape(n, GRID, GRID, PATCH, PATCH).transpose(0, 1, 3, 2, 4).reshape(n, IMG, IMG)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Palette images ``[..., 32, 32]`` -> RGB uint8 ``[..., 32, 32, 3]``."""
    return PALETTE[images]


# ----------------------------------------------------------------------------- model

@dataclass(frozen=True)
class MaskGITConfig:
    codebook_size: int = CODEBOOK_SIZE
    n_tokens: int = N_TOKENS
    num_classes: int = NUM_CLASSES
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0


class TinyMaskGIT(nn.Module):
    """Class-conditional masked token transformer built from timm ``Block``s.

    forward(tokens ``[B, N]`` int64 with ``MASK_ID`` for masks, labels ``[B]`` int64 with
    ``num_classes`` meaning "unconditional") -> logits ``[B, N, codebook_size]``.
    ``attn_mask`` (training only): boolean ``[B, 1, N, N]`` passed to every block.
    """

    def __init__(self, config: MaskGITConfig = MaskGITConfig()) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.config = config
        c = config
        self.mask_id = c.codebook_size
        self.tok_embed = nn.Embedding(c.codebook_size + 1, c.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.n_tokens, c.dim))
        self.cls_embed = nn.Embedding(c.num_classes + 1, c.dim)
        self.blocks = nn.ModuleList([Block(c.dim, c.heads, mlp_ratio=c.mlp_ratio, qkv_bias=True)
                                     for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.codebook_size)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.cls_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.tok_embed(tokens) + self.pos_embed + self.cls_embed(labels)[:, None, :]
        for blk in self.blocks:
            x = blk(x) if attn_mask is None else blk(x, attn_mask=attn_mask)
        return self.head(self.norm(x))


class TokenClassifier(nn.Module):
    """Quality-metric classifier: one-hot token grid -> hidden features (for FD) -> class logits."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(CODEBOOK_SIZE + 1, 8)
        self.fc1 = nn.Linear(N_TOKENS * 8, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(self.embed(tokens).flatten(1)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(tokens))


def load_pretrained(path: str = WEIGHTS) -> Tuple[TinyMaskGIT, TokenClassifier]:
    """The shipped testbed model and metric classifier (eval mode, float32, CPU)."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"testbed weights not found at {path}: run python -m vprune.testbed.train_maskgit")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    cfg = MaskGITConfig(**json.loads(meta.get("config", "{}")))
    sd = load_file(path)
    model = TinyMaskGIT(cfg)
    model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    clf = TokenClassifier()
    clf.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("clf.")})
    return model.eval(), clf.eval()


# ----------------------------------------------------------------------------- sampler

def mask_schedule(n_tokens: int, steps: int) -> list:
    """Masked tokens after step s (s = 0 .. steps-2) under the cosine schedule (aMUSEd's rule)."""
    return [math.floor(n_tokens * math.cos(math.pi / 2 * (s + 1) / steps)) for s in range(steps - 1)]


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, steps: int = 12, guidance: float = 3.0,
           temperature: Tuple[float, float] = (2.0, 0.0), seed: int = 0, cfg: str = "batch",
           return_trace: bool = False):
    """Generate token grids ``[B, N]`` for class ``labels`` ``[B]``.

    guidance: classifier-free guidance scale (<= 1: no unconditional pass); cfg: "batch" (one
    forward on the concatenated [uncond; cond] batch, like aMUSEd) or "two_pass" (two forwards).
    temperature: Gumbel noise on the confidence, annealed linearly from [0] to [1] over the steps.
    Deterministic for a given seed (CPU generator). return_trace: also return the model input of
    every step (list of ``[B, N]``).
    """
    if cfg not in ("batch", "two_pass"):
        raise ValueError(f"cfg={cfg!r} is invalid: allowed 'batch' or 'two_pass'")
    device = labels.device
    gen = torch.Generator().manual_seed(seed)
    b = labels.shape[0]
    n = model.config.n_tokens if hasattr(model, "config") else N_TOKENS
    mask_id = getattr(model, "mask_id", MASK_ID)
    x = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    null = torch.full_like(labels, model.config.num_classes if hasattr(model, "config") else NUM_CLASSES)
    temps = torch.linspace(temperature[0], temperature[1], steps)
    trace = []
    for s in range(steps):
        trace.append(x.clone())
        if guidance > 1.0:
            if cfg == "batch":
                out = model(torch.cat([x, x]), torch.cat([null, labels])).float()
                unc, con = out.chunk(2)
            else:
                con = model(x, labels).float()
                unc = model(x, null).float()
            logits = unc + guidance * (con - unc)
        else:
            logits = model(x, labels).float()
        probs = logits.softmax(-1).cpu()
        unknown = (x == mask_id).cpu()
        pred = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(b, n)
        pred = torch.where(unknown, pred, x.cpu())
        if s == steps - 1:
            x = pred.to(device)
            break
        ratio = math.cos(math.pi / 2 * (s + 1) / steps)
        mask_len = torch.full((b, 1), math.floor(n * ratio), dtype=torch.long)
        mask_len = torch.clamp(torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len), min=1)
        sel = torch.gather(probs, -1, pred[..., None])[..., 0]
        sel = torch.where(unknown, sel, torch.full_like(sel, float("inf")))
        noise = torch.rand(sel.shape, generator=gen).clamp(1e-20)
        conf = torch.log(sel.clamp(1e-20)) + float(temps[s]) * -torch.log((-torch.log(noise)).clamp(1e-20))
        conf = torch.where(unknown, conf, torch.full_like(conf, float("inf")))
        cut = torch.gather(conf.sort(-1).values, 1, mask_len)
        remask = conf < cut
        x = torch.where(remask, torch.full_like(pred, mask_id), pred).to(device)
    return (x, trace) if return_trace else x


# ----------------------------------------------------------------------------- metric

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``[n, d]`` (no scipy needed)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.cov(a, rowvar=False) + 1e-6 * np.eye(a.shape[1])
    s2 = np.cov(b, rowvar=False) + 1e-6 * np.eye(b.shape[1])
    w, v = np.linalg.eigh(s1)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1h @ s2 @ s1h
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


class QualityMetric:
    """Deterministic quality of generated token grids: classifier accuracy and FD to real samples."""

    def __init__(self, classifier: TokenClassifier, n_real: int = 2000, seed: int = 987654) -> None:
        self.clf = classifier.eval()
        images, labels = make_dataset(n_real, seed)     # held out: training uses other seeds
        with torch.no_grad():
            self.real_feats = self.clf.features(torch.from_numpy(encode(images))).numpy().astype(np.float64)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        tokens = tokens.cpu().clamp(max=CODEBOOK_SIZE)
        feats = self.clf.features(tokens)
        acc = (self.clf.fc2(feats).argmax(-1) == labels.cpu()).float().mean().item()
        fd = frechet_distance(feats.numpy().astype(np.float64), self.real_feats)
        return {"accuracy": acc, "fd": fd}


def config_json(cfg: MaskGITConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)
