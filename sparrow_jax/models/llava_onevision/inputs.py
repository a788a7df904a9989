"""LLaVA-OneVision's input side (over `sparrow_jax.io.llava_inputs`): uniformly sampled video frames
and anyres images at its tile size, its chat prompt, and its tokenizer markers."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np

from sparrow_jax.io import llava_inputs
from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX
from sparrow_jax.models.family import VisualReaders
from sparrow_jax.models.llava_onevision.batching import num_visual_tokens
from sparrow_jax.models.llava_onevision.config import LlavaOneVisionConfig

VIDEO_OPTIONS = ("num_frames",)
FRAMES_NOTE = "samples {num_frames} frames per video at its own tile size"
DEFAULT_NUM_FRAMES = 32
TOKENIZER_MARKS = ()


def visual_readers(cfg: LlavaOneVisionConfig, model_dir, *, budget: int, options: dict) -> VisualReaders:
    """`options["num_frames"]` frames per video (default 32), the preprocessor_config.json of
    `model_dir` when there is one, videos cut to the visual-token budget."""
    pjson = None if model_dir is None else Path(model_dir) / "preprocessor_config.json"
    pcfg = llava_inputs.LlavaPreprocessConfig.from_hf_preprocessor_json(pjson) if pjson and pjson.is_file() else None
    n = options.get("num_frames")
    n = DEFAULT_NUM_FRAMES if n is None else int(n)
    return VisualReaders(
        video=lambda path: llava_inputs.preprocess_video(path, cfg, pcfg, num_frames=n, max_visual_tokens=budget),
        image=lambda image: llava_inputs.preprocess_image(image, cfg, pcfg))


def chat_prompt(cfg: LlavaOneVisionConfig, codec, visual, question: str):
    """`<video pads>\\nquestion` in the user turn, then the assistant prefix."""
    segs = [codec.encode(QWEN_USER_PREFIX)] + ([visual] if visual is not None else [])
    return llava_inputs.build_prompt(segs + [codec.encode("\n" + question + QWEN_ASSISTANT_PREFIX)], cfg)


def rope_delta(prompt, cfg: LlavaOneVisionConfig) -> int:
    """1-D RoPE: positions continue from the prompt, delta 0."""
    return 0


def blank_video(cfg: LlavaOneVisionConfig, frames: int, frame_side: int):
    """A video of `frames` zero frames at the SigLIP tile size (frame_side unused) and its token ids."""
    v = cfg.vision
    pixels = np.zeros((frames, v.num_channels, v.image_size, v.image_size), np.float32)
    visual = types.SimpleNamespace(kind="video", pixel_values=pixels)
    return visual, [cfg.video_token_id] * num_visual_tokens("video", cfg, num_frames=frames)
