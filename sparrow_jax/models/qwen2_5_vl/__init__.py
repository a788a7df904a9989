"""Qwen2.5-VL, the target family `qwen2_5_vl`: config (`config`), Flax NNX modules (`modules`), host-side
layouts and batch builder (`batching`), HF checkpoints (`checkpoint`), input side (`inputs`), and
`FAMILY`, its entry in `registry.FAMILIES`."""

from sparrow_jax.models.family import TargetFamily
from sparrow_jax.models.qwen2_5_vl import inputs
from sparrow_jax.models.qwen2_5_vl.batching import (SegmentLayout, VisionLayout, chunk_layout, prepare_prefill_batch,
                                                    rope_index, vision_chunks, vision_layout)
from sparrow_jax.models.qwen2_5_vl.checkpoint import load_qwen2_5_vl, save_qwen2_5_vl
from sparrow_jax.models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig, TextConfig, VisionConfig
from sparrow_jax.models.qwen2_5_vl.modules import PatchMerger, Qwen25VL, TextModel, VisionAttention, VisionBlock, \
    VisionTower

FAMILY = TargetFamily(
    model_type="qwen2_5_vl", name="Qwen2.5-VL", config_cls=Qwen25VLConfig, module_cls=Qwen25VL,
    load=load_qwen2_5_vl, save=save_qwen2_5_vl, prepare_prefill_batch=prepare_prefill_batch,
    rope_delta=inputs.rope_delta, video_options=inputs.VIDEO_OPTIONS, frames_note=inputs.FRAMES_NOTE,
    visual_readers=inputs.visual_readers, chat_prompt=inputs.chat_prompt, tokenizer_marks=inputs.TOKENIZER_MARKS,
    blank_video=inputs.blank_video)

__all__ = ["FAMILY", "ConfigError", "PatchMerger", "Qwen25VL", "Qwen25VLConfig", "SegmentLayout", "TextConfig",
           "TextModel", "VisionAttention", "VisionBlock", "VisionConfig", "VisionLayout", "VisionTower", "chunk_layout",
           "load_qwen2_5_vl", "prepare_prefill_batch", "rope_index", "save_qwen2_5_vl", "vision_chunks",
           "vision_layout"]
