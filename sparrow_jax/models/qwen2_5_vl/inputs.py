"""Qwen2.5-VL's input side (over `sparrow_jax.io.vision_inputs`): its video/image preprocessing from
the vision config and the checkpoint's preprocessor JSON files, its chat prompt, its tokenizer markers,
and the rope delta of a built prompt."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np

from sparrow_jax.io import vision_inputs as vi
from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX
from sparrow_jax.models.family import VisualReaders
from sparrow_jax.models.qwen2_5_vl.batching import rope_index
from sparrow_jax.models.qwen2_5_vl.config import Qwen25VLConfig

VIDEO_OPTIONS = ("fps", "max_frames", "min_pixels", "max_pixels")
FRAMES_NOTE = "samples by fps ({fps}, {max_frames})"
# besides <|im_start|> / <|im_end|>: one-token markers, and the config field naming the id it must have
TOKENIZER_MARKS = (("<|vision_start|>", None), ("<|video_pad|>", "video_token_id"))


def _file(model_dir, *names) -> Path | None:
    """The first of `names` that is a file in model_dir (None without a directory or a file)."""
    d = None if model_dir is None else Path(model_dir)
    return next((d / n for n in names if d is not None and (d / n).is_file()), None)


def preprocessing(cfg: Qwen25VLConfig, model_dir, *, budget: int, options: dict):
    """(video, image) VisionPreprocessConfig: the vision config, the preprocessor JSON files in
    `model_dir` (a video falls back to the image file, as transformers does), then `options` (fps,
    max_frames: video only; min_pixels, max_pixels) and the visual-token budget."""
    pixels = {k: options[k] for k in ("min_pixels", "max_pixels") if options.get(k) is not None}
    frames = {k: options[k] for k in ("fps", "max_frames") if options.get(k) is not None}
    video_json = _file(model_dir, "video_preprocessor_config.json", "preprocessor_config.json")
    vcfg = vi.VisionPreprocessConfig.for_model(cfg.vision, video=True, preprocessor_json=video_json,
                                               max_visual_tokens=budget, **pixels, **frames)
    icfg = vi.VisionPreprocessConfig.for_model(cfg.vision, video=False,
                                               preprocessor_json=_file(model_dir, "preprocessor_config.json"),
                                               max_visual_tokens=budget, **pixels)
    return vcfg, icfg


def visual_readers(cfg: Qwen25VLConfig, model_dir, *, budget: int, options: dict) -> VisualReaders:
    vcfg, icfg = preprocessing(cfg, model_dir, budget=budget, options=options)
    return VisualReaders(video=lambda path: vi.preprocess_video(path, vcfg),
                         image=lambda image: vi.preprocess_image(image, icfg))


def chat_prompt(cfg: Qwen25VLConfig, codec, visual, question: str):
    """`<|vision_start|>pads<|vision_end|>question` in the user turn, then the assistant prefix."""
    ids = vi.VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id,
                            cfg.video_token_id)
    segs = [codec.encode(QWEN_USER_PREFIX)] + ([visual] if visual is not None else [])
    return vi.build_multimodal_prompt(segs + [codec.encode(question + QWEN_ASSISTANT_PREFIX)], ids)


def rope_delta(prompt, cfg: Qwen25VLConfig) -> int:
    """The M-RoPE decode delta of one built prompt (`rope_index`)."""
    return rope_index(prompt.input_ids, prompt.mm_token_type_ids, [v.grid_thw for v in prompt.visuals],
                      [v.second_per_grid_t for v in prompt.visuals], cfg)[1]


def blank_video(cfg: Qwen25VLConfig, frames: int, frame_side: int):
    """A video of `frames` zero frames of frame_side² px at 2 fps (only shapes matter) and its token ids."""
    v = cfg.vision
    side = frame_side // (v.patch_size * v.spatial_merge_size) * v.spatial_merge_size  # patches per side
    grid = (max(1, frames // v.temporal_patch_size), side, side)
    pixels = np.zeros((grid[0] * side * side, v.patch_dim), np.float32)
    visual = types.SimpleNamespace(kind="video", pixel_values=pixels, grid_thw=grid,
                                   second_per_grid_t=v.temporal_patch_size / 2.0)  # 2 fps
    n_vis = grid[0] * (side // v.spatial_merge_size) ** 2
    return visual, [cfg.vision_start_token_id] + [cfg.video_token_id] * n_vis + [cfg.vision_end_token_id]
