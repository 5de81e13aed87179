"""The testbed policy's own tokenizer, action tokenizer and processor (no download).

Word-level vocabulary (``vocab.json``), OpenVLA-style prompt and action binning:

    processor = TestbedProcessor.from_pretrained()          # the shipped vocab.json
    inputs = processor(prompt, obs["image"])                # input_ids, attention_mask, pixel_values
    prompt = "In: What action should the robot take to pick up the red square?\\nOut:"

Token ids below ``n_words`` (64) are words; the last ``n_action_bins`` (256) ids of the LLM
vocabulary are action bins, as in OpenVLA: an action value ``a`` in [-1, 1] becomes the token
``vocab_size - digitize(a, linspace(-1, 1, n_action_bins))`` and decodes to the bin centre.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VOCAB = os.path.join(HERE, "vocab.json")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [
    "in", "out", ":", "?", "what", "action", "should", "the", "robot", "take", "to",
    "pick", "up", "place", "move", "push", "a", "on", "and",
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
    "square", "circle", "triangle", "block", "ball", "cube",
]
N_WORDS = 64  # word ids are < N_WORDS; action ids start after them

_TOKEN_RE = re.compile(r"[a-z]+|[?:]")


def build_vocab() -> Dict[str, int]:
    """The shipped vocabulary (specials, then words), ids 0..len-1 < ``N_WORDS``."""
    words = SPECIALS + WORDS
    assert len(words) <= N_WORDS
    return {w: i for i, w in enumerate(words)}


def prompt_for(instruction: str) -> str:
    """OpenVLA's prompt template around an instruction."""
    return f"In: What action should the robot take to {instruction.strip().lower()}?\nOut:"


class TestbedTokenizer:
    """Lower-cases, splits words and ``?``/``:``, maps to ids; ``<s>`` first (BOS), no EOS."""

    __test__ = False  # not a pytest class

    def __init__(self, vocab: Dict[str, int]):
        self.vocab = dict(vocab)
        self.ids_to_tokens = {i: w for w, i in self.vocab.items()}
        self.pad_token_id = self.vocab["<pad>"]
        self.bos_token_id = self.vocab["<s>"]
        self.eos_token_id = self.vocab["</s>"]
        self.unk_token_id = self.vocab["<unk>"]

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None) -> "TestbedTokenizer":
        path = path or DEFAULT_VOCAB
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        with open(path) as f:
            return cls(json.load(f))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.vocab, f, indent=0, sort_keys=False)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:
        return [self.bos_token_id] + [self.vocab.get(t, self.unk_token_id)
                                      for t in _TOKEN_RE.findall(text.lower())]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.ids_to_tokens.get(int(i), f"<{int(i)}>") for i in ids)

    def __call__(self, text: Union[str, Sequence[str]], return_tensors: str = "pt") -> Dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask`` [B, L] (int64)."""
        texts = [text] if isinstance(text, str) else list(text)
        seqs = [self.encode(t) for t in texts]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ActionTokenizer:
    """Continuous actions in [-1, 1] <-> the last ``n_bins`` token ids of a ``vocab_size`` vocabulary."""

    def __init__(self, vocab_size: int, n_bins: int = 256):
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.bins = np.linspace(-1.0, 1.0, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """float [..., D] -> int64 token ids [..., D]."""
        a = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        return (self.vocab_size - np.digitize(a, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """int token ids [..., D] -> bin centres [..., D] in [-1, 1]."""
        d = self.vocab_size - np.asarray(token_ids, dtype=np.int64)
        d = np.clip(d - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[d]


def image_to_pixel_values(images: Union[np.ndarray, Sequence[np.ndarray]], fused: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] image(s) -> float32 [B, 3 (6 if fused), H, W] in [-1, 1].

    With ``fused`` the same image is stacked twice on the channel axis, as OpenVLA's fused
    (DINOv2 + SigLIP) processor does with its two normalisations.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return torch.cat([x, x], dim=1) if fused else x.contiguous()


class TestbedProcessor:
    """``processor(prompt, image)`` -> input_ids, attention_mask, pixel_values, like PrismaticProcessor."""

    __test__ = False

    def __init__(self, tokenizer: TestbedTokenizer, fused: bool = False):
        self.tokenizer = tokenizer
        self.fused = fused

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, fused: bool = False) -> "TestbedProcessor":
        return cls(TestbedTokenizer.from_pretrained(path), fused=fused)

    def __call__(self, text: Union[str, Sequence[str]], images: Any, return_tensors: str = "pt") -> Dict[str, torch.Tensor]:
        out = self.tokenizer(text)
        out["pixel_values"] = image_to_pixel_values(images, fused=self.fused)
        return out
