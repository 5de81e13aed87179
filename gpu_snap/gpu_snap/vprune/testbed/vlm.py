"""The tiny trained testbed VLM: a real transformers ``LlavaForConditionalGeneration`` (CLIP vision
tower, 2-layer projector, Llama LM) trained on the synthetic VQA task of ``vprune.testbed.vqa``.

Shipped files (next to this module, nothing is downloaded):

    vlm_config.json        the architecture (this module's own small schema, turned into a LlavaConfig)
    vlm_tokenizer.json     the word-level vocabulary (special tokens first; "<image>" is the image token)
    vlm.safetensors        the trained fp32 weights (``train_vlm.py`` reproduces them)

Shapes: 64 x 64 RGB images, 8 px patches -> 64 visual tokens per image (the CLS token is dropped, as
LLaVA's "default" feature strategy does); a 4-layer Llama LM (hidden 64, 4 query / 2 key-value
heads), so pruning at layer K=2 leaves two layers over the kept tokens.

Prompt layout (what ``VLMTokenizer.prompt`` builds, LLaVA-1.5 style with the image expanded):

    <s> user : <image> x 64 <question words> assistant :     -> the next token is the answer word

    model, tok = load_vlm()
    batch = collate(samples, tok)                 # left-padded input_ids, attention_mask, pixel_values
    words = answer(model, tok, samples)           # greedy generate(max_new_tokens=1), one word each

Tested with transformers 5.24 (CPU); written for 5.17+ (the GPU machines). The loader maps the
state-dict key layouts of 4.4x and 5.x, but transformers 4.40's LLaVA expects one ``<image>`` token per
image in the prompt (it expands it itself), so prompts built here (already expanded, as processors of
newer versions do) do not run there.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATH = os.path.join(HERE, "vlm_config.json")
TOKENIZER_PATH = os.path.join(HERE, "vlm_tokenizer.json")
WEIGHTS_PATH = os.path.join(HERE, "vlm.safetensors")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")

DEFAULT_CONFIG: Dict[str, Any] = {
    "image_size": 64,
    "patch_size": 8,
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 10000.0},
    "vision_feature_layer": -1,
    "prune_layer": 2,
}


# ------------------------------------------------------------------------------------ tokenizer

class VLMTokenizer:
    """Word-level tokenizer: whitespace split, one id per word, "<unk>" for unknown words.

    vocab: list of words; the first five are ``SPECIAL_TOKENS`` (pad 0, bos 1, eos 2, unk 3, image 4).
    image_seq_length: image tokens per image in a prompt (the LLaVA processor's expansion).
    """

    def __init__(self, vocab: Sequence[str], image_seq_length: int = 64):
        vocab = list(vocab)
        if tuple(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"the vocabulary must start with {list(SPECIAL_TOKENS)}, got {vocab[:5]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the vocabulary has duplicate words")
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.image_seq_length = image_seq_length
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id, self.image_token_id = range(5)

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def from_file(cls, path: str = TOKENIZER_PATH, image_seq_length: int = 64) -> "VLMTokenizer":
        with open(path) as f:
            data = json.load(f)
        return cls(data["vocab"], image_seq_length=data.get("image_seq_length", image_seq_length))

    def save(self, path: str = TOKENIZER_PATH) -> None:
        with open(path, "w") as f:
            json.dump({"vocab": self.vocab, "image_seq_length": self.image_seq_length}, f, indent=0)
            f.write("\n")

    def encode(self, text: str) -> List[int]:
        return [self.ids.get(w, self.unk_token_id) for w in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def prompt(self, question: str, with_image: bool = True) -> List[int]:
        """``<s> user : <image> x N question assistant :`` as ids (``with_image=False`` drops the image)."""
        image = [self.image_token_id] * self.image_seq_length if with_image else []
        return ([self.bos_token_id] + self.encode("user :") + image + self.encode(question)
                + self.encode("assistant :"))


def build_vocab() -> List[str]:
    from .vqa import WORDS

    return list(SPECIAL_TOKENS) + list(dict.fromkeys(WORDS))


# ---------------------------------------------------------------------------------------- model

def read_config(path: str = CONFIG_PATH) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def llava_config(cfg: Optional[Dict[str, Any]] = None, vocab_size: Optional[int] = None, attn: str = "sdpa"):
    """A transformers ``LlavaConfig`` from this module's schema (``DEFAULT_CONFIG`` when None)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = cfg or DEFAULT_CONFIG
    vocab_size = vocab_size or cfg.get("vocab_size") or len(build_vocab())
    n_patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
    v = cfg["vision"]
    vision = CLIPVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                              num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                              image_size=cfg["image_size"], patch_size=cfg["patch_size"], num_channels=3,
                              projection_dim=v["hidden_size"])
    t = dict(cfg["text"])
    rope_theta = t.pop("rope_theta", 10000.0)
    text = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False, rope_theta=rope_theta, **t)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=4, image_seq_length=n_patches,
                         vision_feature_layer=cfg["vision_feature_layer"], vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    # transformers 4.4x reads image_token_index, 5.x image_token_id (an alias in some releases)
    for name in ("image_token_id", "image_token_index"):
        try:
            setattr(config, name, 4)
        except Exception:  # a read-only alias property
            pass
    config._attn_implementation = attn
    return config


def build_vlm(cfg: Optional[Dict[str, Any]] = None, seed: int = 0, attn: str = "sdpa"):
    """A randomly initialised testbed ``LlavaForConditionalGeneration`` (fp32, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(cfg, attn=attn))
    _set_generation_ids(model)
    return model.eval()


def _set_generation_ids(model) -> None:
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = 0, 1, 2


def _canonical_key(key: str) -> str:
    """One spelling for the state-dict keys of the LLaVA layouts of transformers 4.4x and 5.x."""
    key = key.replace("vision_model.", "")
    if key.startswith("model."):
        key = key[len("model."):]
    key = key.replace("language_model.model.", "language_model.")
    key = key.replace("language_model.lm_head.", "lm_head.")
    return key


def load_state_dict_any_layout(model, state: Dict[str, torch.Tensor]) -> None:
    """Load ``state`` saved by any supported transformers version into ``model`` (strict)."""
    by_canon = {_canonical_key(k): v for k, v in state.items()}
    expected = model.state_dict()
    mapped, missing = {}, []
    for key in expected:
        canon = _canonical_key(key)
        if canon in by_canon:
            mapped[key] = by_canon.pop(canon)
        elif key.endswith("position_ids"):  # a buffer some versions keep in the state dict
            continue
        else:
            missing.append(key)
    unexpected = [k for k in by_canon if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"testbed VLM weights do not fit this transformers version's LLaVA: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(mapped, strict=False)


def load_vlm(dtype: torch.dtype = torch.float32, attn: str = "sdpa", device: str = "cpu",
             weights: str = WEIGHTS_PATH, config: str = CONFIG_PATH, tokenizer: str = TOKENIZER_PATH):
    """The shipped trained testbed VLM and its tokenizer: ``(model, tok)``, eval mode, no download."""
    from safetensors.torch import load_file

    if not os.path.exists(weights):
        raise FileNotFoundError(f"testbed VLM weights not found at {weights}: run "
                                f"`python -m vprune.testbed.train_vlm` to train them")
    cfg = read_config(config)
    tok = VLMTokenizer.from_file(tokenizer)
    model = build_vlm(cfg, attn=attn)
    load_state_dict_any_layout(model, load_file(weights))
    return model.to(device=device, dtype=dtype).eval(), tok


# ---------------------------------------------------------------------------------------- batches

def pixel_values(images: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im) for im in images]).astype(np.float32)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x.to(dtype)


def collate(samples: Sequence[Any], tok: VLMTokenizer, with_image: bool = True,
            dtype: torch.dtype = torch.float32, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` [B, L] and ``pixel_values`` [B, 3, H, W].

    samples: objects with ``.image`` (uint8 [H, W, 3]) and ``.question``. ``with_image=False`` gives
    text-only prompts (no image tokens, no pixel values).
    """
    rows = [tok.prompt(s.question, with_image) for s in samples]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if with_image:
        out["pixel_values"] = pixel_values([s.image for s in samples], dtype).to(device)
    return out


@torch.no_grad()
def answer(model, tok: VLMTokenizer, samples: Sequence[Any], batch_size: int = 32,
           images: Optional[Sequence[np.ndarray]] = None) -> List[str]:
    """The model's one-word answers (greedy ``generate``, one new token), in order.

    images: optional replacement images (e.g. blank or shuffled ones for the image-dependence check).
    """
    out: List[str] = []
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i:i + batch_size])
        if images is not None:
            chunk = [_Replaced(im, s.question) for im, s in zip(images[i:i + batch_size], chunk)]
        batch = collate(chunk, tok, dtype=dtype, device=str(device))
        gen = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
        out.extend(tok.vocab[int(t)] for t in gen[:, -1])
    return out


class _Replaced:
    def __init__(self, image: np.ndarray, question: str):
        self.image, self.question = image, question


def accuracy(predictions: Sequence[str], samples: Sequence[Any]) -> float:
    return float(np.mean([p == s.answer for p, s in zip(predictions, samples)])) if samples else 0.0
