"""Tiny random-weight VLM hosts for the in-LLM pruning tests (built in memory, nothing downloaded).

Each builder returns an eval-mode model in fp32 with a fixed seed, small enough that a forward pass
takes a few milliseconds on one CPU core. Prompts are built by hand with the host's own special
token layout (LLaVA: ``image_token_id`` repeated per image; Qwen2-VL: vision_start, image pads,
vision_end).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

# Tiny models on shared CPUs: intra-op threads only add contention (a 30 ms forward took 1.8 s with
# the default thread count at load 11 on 2 cores). The test process is ours; set it once here.
torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------- LLaVA

LLAVA_IMAGE_TOKEN = 60
LLAVA_PAD = 0
LLAVA_VOCAB = 64
LLAVA_IMAGE_SIZE = 8
LLAVA_PATCH = 2
LLAVA_TOKENS_PER_IMAGE = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2  # 16 ("default" strategy drops CLS)


def llava_config(layers: int = 4, attn: str = "sdpa", **text_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = dict(vocab_size=LLAVA_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=LLAVA_PAD, bos_token_id=1, eos_token_id=2)
    text.update(text_overrides)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH, num_channels=3,
                              projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_id=LLAVA_IMAGE_TOKEN,
                      image_seq_length=LLAVA_TOKENS_PER_IMAGE, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = attn
    return cfg


def tiny_llava(seed: int = 0, layers: int = 4, attn: str = "sdpa", dtype=torch.float32, **text_overrides):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(layers, attn, **text_overrides))
    model.generation_config.pad_token_id = LLAVA_PAD
    return model.to(dtype).eval()


def llava_prompt(texts: Sequence[Sequence[int]], n_images: Sequence[int], seed: int = 0,
                 pad_to: Optional[int] = None, image_first: bool = False, dtype=torch.float32) -> dict:
    """A left-padded batch: row b = BOS, text_b[:half], <image> x 16 per image, text_b[half:].

    texts: per-row text token ids (values in 3..59); n_images: images per row.
    Returns input_ids, attention_mask, pixel_values (one per image, in row order).
    """
    g = torch.Generator().manual_seed(seed)
    rows: List[List[int]] = []
    for text, k in zip(texts, n_images):
        text = list(text)
        half = 0 if image_first else len(text) // 2
        ids = [1] + text[:half]
        for i in range(k):
            ids += [LLAVA_IMAGE_TOKEN] * LLAVA_TOKENS_PER_IMAGE
            if i + 1 < k:
                ids += [3 + i]  # a separator token between images
        ids += text[half:]
        rows.append(ids)
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    input_ids = torch.full((len(rows), length), LLAVA_PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r):] = torch.tensor(r)
        attention_mask[b, length - len(r):] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    total = sum(n_images)
    if total:
        out["pixel_values"] = torch.randn(total, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=g).to(dtype)
    return out


# ------------------------------------------------------------------------------------ Qwen2(.5)-VL

QWEN_VOCAB = 128
QWEN_IMAGE_TOKEN = 120
QWEN_VIDEO_TOKEN = 121
QWEN_VISION_START = 122
QWEN_VISION_END = 123
QWEN_PAD = 0
QWEN_PATCH = 2
QWEN_MERGE = 2
QWEN_TEMPORAL = 2


def qwen_config(version: str = "2.5", layers: int = 4, attn: str = "sdpa"):
    if version == "2.5":
        from transformers import Qwen2_5_VLConfig as Cfg
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                      window_size=8, out_hidden_size=32, fullatt_block_indexes=[1], tokens_per_second=2)
    else:
        from transformers import Qwen2VLConfig as Cfg
        vision = dict(depth=2, embed_dim=16, hidden_size=32, mlp_ratio=2, num_heads=2, in_channels=3,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    text = dict(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                pad_token_id=QWEN_PAD, bos_token_id=1, eos_token_id=2)
    cfg = Cfg(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_TOKEN,
              video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=QWEN_VISION_START,
              vision_end_token_id=QWEN_VISION_END)
    cfg._attn_implementation = attn
    return cfg


def tiny_qwen(version: str = "2.5", seed: int = 0, layers: int = 4, attn: str = "sdpa", dtype=torch.float32):
    if version == "2.5":
        from transformers import Qwen2_5_VLForConditionalGeneration as Cls
    else:
        from transformers import Qwen2VLForConditionalGeneration as Cls
    torch.manual_seed(seed)
    model = Cls(qwen_config(version, layers, attn))
    model.generation_config.pad_token_id = QWEN_PAD
    return model.to(dtype).eval()


def qwen_prompt(texts: Sequence[Sequence[int]], grids: Sequence[Sequence[Tuple[int, int]]], seed: int = 0,
                dtype=torch.float32) -> dict:
    """A left-padded batch; row b = text_b[:half], per image (vision_start, pads, vision_end), text_b[half:].

    grids: per row, a list of (h, w) patch grids (t = 1); each image gives h*w/4 visual tokens.
    Returns input_ids, attention_mask, mm_token_type_ids (1 = image, 2 = video: what the processor returns
    and what mRoPE needs), pixel_values [patches, 3*2*2*2], image_grid_thw.
    """
    g = torch.Generator().manual_seed(seed)
    rows, thw = [], []
    for text, imgs in zip(texts, grids):
        text = list(text)
        half = len(text) // 2
        ids = [1] + text[:half]
        for h, w in imgs:
            n = h * w // (QWEN_MERGE * QWEN_MERGE)
            ids += [QWEN_VISION_START] + [QWEN_IMAGE_TOKEN] * n + [QWEN_VISION_END]
            thw.append((1, h, w))
        ids += text[half:]
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), QWEN_PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r):] = torch.tensor(r)
        attention_mask[b, length - len(r):] = 1
    mm_types = torch.where(input_ids == QWEN_IMAGE_TOKEN, 1, 0) + torch.where(input_ids == QWEN_VIDEO_TOKEN, 2, 0)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types.int()}
    if thw:
        patches = sum(t * h * w for t, h, w in thw)
        out["pixel_values"] = torch.randn(patches, 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH, generator=g).to(dtype)
        out["image_grid_thw"] = torch.tensor(thw, dtype=torch.long)
    return out
