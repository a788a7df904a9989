"""LLaVA-OneVision, the target family `llava_onevision`: config (`config`), Flax NNX modules (`modules`),
host-side layouts and batch builder (`batching`), HF checkpoints (`checkpoint`), input side (`inputs`),
and `FAMILY`, its entry in `registry.FAMILIES`."""

from sparrow_jax.models.family import TargetFamily
from sparrow_jax.models.llava_onevision import inputs
from sparrow_jax.models.llava_onevision.batching import (TILE_BUCKET, AnyresGeometry, LlavaVisionLayout,
                                                         anyres_geometry, num_tiles, num_visual_tokens,
                                                         prepare_prefill_batch, select_best_resolution, vision_layout,
                                                         visual_taps)
from sparrow_jax.models.llava_onevision.checkpoint import load_llava_onevision, save_llava_onevision
from sparrow_jax.models.llava_onevision.config import (DEFAULT_GRID_PINPOINTS, ConfigError, LlavaOneVisionConfig,
                                                       SiglipVisionConfig, TextConfig)
from sparrow_jax.models.llava_onevision.modules import (LayerNorm, LlavaOneVision, MultiModalProjector,
                                                        SiglipAttention, SiglipEmbeddings, SiglipEncoder,
                                                        SiglipEncoderLayer, SiglipMLP, SiglipVisionTower, TextModel)

FAMILY = TargetFamily(
    model_type="llava_onevision", name="LLaVA-OneVision", config_cls=LlavaOneVisionConfig, module_cls=LlavaOneVision,
    load=load_llava_onevision, save=save_llava_onevision, prepare_prefill_batch=prepare_prefill_batch,
    rope_delta=inputs.rope_delta, video_options=inputs.VIDEO_OPTIONS, frames_note=inputs.FRAMES_NOTE,
    visual_readers=inputs.visual_readers, chat_prompt=inputs.chat_prompt, tokenizer_marks=inputs.TOKENIZER_MARKS,
    blank_video=inputs.blank_video)

__all__ = ["DEFAULT_GRID_PINPOINTS", "FAMILY", "TILE_BUCKET", "AnyresGeometry", "ConfigError", "LayerNorm",
           "LlavaOneVision", "LlavaOneVisionConfig", "LlavaVisionLayout", "MultiModalProjector", "SiglipAttention",
           "SiglipEmbeddings", "SiglipEncoder", "SiglipEncoderLayer", "SiglipMLP", "SiglipVisionConfig",
           "SiglipVisionTower", "TextConfig", "TextModel", "anyres_geometry", "load_llava_onevision", "num_tiles",
           "num_visual_tokens", "prepare_prefill_batch", "save_llava_onevision", "select_best_resolution", "vision_layout",
           "visual_taps"]
