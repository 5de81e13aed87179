"""Qwen2-VL and Qwen2.5-VL (transformers ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): visual token pruning inside the LLM.

Tested on transformers 5.24 and 5.17 (CPU; tiny random-weight models in tests/test_qwen2_vl.py). Visual tokens are the image pads (``config.image_token_id``) and video pads
(``config.video_token_id``); each contiguous run between vision_start and vision_end is one image
(or one video) with its own budget. Kept tokens keep their mRoPE positions: the text model's cos/sin
rows are sliced, never recomputed, and ``model.rope_deltas`` is left alone (decoding continues from
the unpruned length, which is what ``generate`` tracks). ``VisualPruning(cuda_graph=True)`` works as
for LLaVA (``_llm_pruning``); ``generate``'s prefill passes text position ids that a plain forward
does not, so the two capture separate graphs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from .llava import VLMIntegration, _has_encoder_outputs


class Qwen2VLIntegration(VLMIntegration):
    name = "qwen2_vl"
    tested_on = "transformers 5.17, 5.24"
    required_config_attrs: Tuple[str, ...] = ("image_token_id",)

    def visual_mask(self, model: Any, input_ids: Any) -> Any:
        vis = input_ids == model.config.image_token_id
        video = getattr(model.config, "video_token_id", None)
        if video is not None:
            vis = vis | (input_ids == video)
        return vis

    def has_visual_inputs(self, inputs: Dict[str, Any]) -> bool:
        return (inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
                or _has_encoder_outputs(inputs))

    def target_tokens(self, model: Any) -> List[str]:
        out = [f"image tokens (id {model.config.image_token_id})"]
        video = getattr(model.config, "video_token_id", None)
        if video is not None:
            out.append(f"video tokens (id {video})")
        return out
