"""LLaVA-OneVision visual preprocessing and prompt layout in numpy + PIL (no jax, no torch).

Reproduces transformers 5.23 `LlavaOnevisionImageProcessorPil` (the PIL backend):

* single-image prompt ("anyres"): tile 0 = the whole image PIL-bicubic-resized to S x S; tiles 1..
  = the image resized (aspect kept, `get_patch_output_size`) into the best `image_grid_pinpoints`
  resolution, zero-padded centred (on uint8, before normalisation) and cut into S x S tiles
  row-major; each tile rescaled (x / 255 in float64 -> float32) and normalised ((x - mean) / std).
* image in a multi-image prompt: padded to a square with the mean colour (int(mean * 255)), resized
  to S x S: a single tile.
* video frames: each frame resized to S x S. HF's `LlavaOnevisionVideoProcessor` does this with
  torchvision (not installed here, and not bit-identical to PIL); we use the PIL path, so a frame is
  processed exactly like a base tile of an image of that frame. Frames are sampled uniformly
  (`np.linspace(0, n - 1, num_frames)`, as LLaVA-OneVision's evaluation code does) — in presentation
  time for a variable-frame-rate video — and cut to a visual-token budget when one is given.

Prompt layout: a visual is `num_visual_tokens` copies of its placeholder (`<image>` /
`<video>` id) with no delimiters; `mm_token_type_ids` is 0 text, 1 image, 2 video. Token counts
come from `sparrow_jax.models.llava_onevision.num_visual_tokens` (the processor's arithmetic).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import PIL.Image

from sparrow_jax.io.vision_inputs import (
    VisionInputError, _array_to_rgb, _as_rgb_frames, _check_regular_file, _decode_selected, _load_image_file,
    _pil_to_rgb, _probe_video)
from sparrow_jax.models.llava_onevision.batching import num_tiles, num_visual_tokens, select_best_resolution
from sparrow_jax.models.llava_onevision.config import LlavaOneVisionConfig

# SigLIP normalisation, as in the released llava-onevision preprocessor_config.json files.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LlavaPreprocessConfig:
    """Pixel normalisation (tile size, grid pinpoints come from the model config)."""

    image_mean: tuple[float, float, float] = SIGLIP_MEAN
    image_std: tuple[float, float, float] = SIGLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_hf_preprocessor_json(cls, path) -> "LlavaPreprocessConfig":
        """Read image_mean / image_std / rescale_factor from a HF `preprocessor_config.json`; refuse
        switches this module does not implement."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_pad"):
            if data.get(flag) is False:
                raise ValueError(f"{path}: {flag}=false is not supported")
        if data.get("resample", 3) != 3:
            raise ValueError(f"{path}: only bicubic resample (3) is supported, got {data['resample']}")
        kw = {k: tuple(float(x) for x in data[k]) for k in ("image_mean", "image_std") if data.get(k) is not None}
        if data.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(data["rescale_factor"])
        return cls(**kw)


@dataclass(frozen=True, eq=False)
class LlavaVisual:
    """One preprocessed visual: `pixel_values` float32 [n, C, S, S] (image tiles, or video frames);
    `image_size` (h, w) of the original image (images only); `anyres` False for an image of a
    multi-image prompt (base tile only)."""

    kind: Literal["image", "video"]
    pixel_values: np.ndarray
    image_size: tuple[int, int] | None = None
    anyres: bool = True
    summary: str = ""  # one line: the sampling and resizing applied (files), for logs

    def num_tokens(self, cfg: LlavaOneVisionConfig) -> int:
        if self.kind == "video":
            return num_visual_tokens("video", cfg, num_frames=self.pixel_values.shape[0])
        return num_visual_tokens("image", cfg, image_hw=self.image_size, anyres=self.anyres)


@dataclass(frozen=True, eq=False)
class LlavaPrompt:
    """Token ids with expanded placeholders; `mm_token_type_ids` 0 text, 1 image, 2 video."""

    input_ids: np.ndarray
    mm_token_type_ids: np.ndarray
    visuals: tuple[LlavaVisual, ...]


# ------------------------------------------------------------------------------------------ pixels


def _resize(rgb_HW3: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL BICUBIC resize of uint8 RGB (HF's PIL backend `resize`)."""
    if rgb_HW3.shape[:2] == (height, width):
        return rgb_HW3
    return np.asarray(PIL.Image.fromarray(rgb_HW3).resize((width, height), resample=PIL.Image.Resampling.BICUBIC))


def _normalize(tiles_u8_NHW3: np.ndarray, pcfg: LlavaPreprocessConfig) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W]: HF rescale (float64 multiply, cast) then normalize."""
    x = (tiles_u8_NHW3.astype(np.float64) * pcfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(pcfg.image_mean, np.float32)) / np.asarray(pcfg.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def patch_output_size(image_hw, target_hw) -> tuple[int, int]:
    """HF `get_patch_output_size`: fit inside target keeping aspect (ceil on the free side)."""
    (oh, ow), (th, tw) = image_hw, target_hw
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(int(np.ceil(oh * sw)), th), tw
    return th, min(int(np.ceil(ow * sh)), tw)


def image_tiles_u8(rgb_HW3: np.ndarray, cfg: LlavaOneVisionConfig, pcfg: LlavaPreprocessConfig,
                   anyres: bool = True) -> np.ndarray:
    """uint8 tiles [n, S, S, 3] of one image (see the module docstring)."""
    S = cfg.vision.image_size
    h, w = rgb_HW3.shape[:2]
    if not anyres:
        side = max(h, w)
        sq = np.empty((side, side, 3), np.uint8)
        sq[:] = np.asarray([int(m * 255) for m in pcfg.image_mean], np.uint8)
        top, left = (side - h) // 2 if h < side else 0, (side - w) // 2 if w < side else 0
        sq[top:top + h, left:left + w] = rgb_HW3
        return _resize(sq, S, S)[None]
    best_h, best_w = select_best_resolution((h, w), cfg.image_grid_pinpoints)
    nh, nw = patch_output_size((h, w), (best_h, best_w))
    resized = _resize(rgb_HW3, nh, nw)
    py, px = divmod(best_h - nh, 2), divmod(best_w - nw, 2)
    padded = np.pad(resized, ((py[0], py[0] + py[1]), (px[0], px[0] + px[1]), (0, 0)))
    tiles = [padded[i:i + S, j:j + S] for i in range(0, best_h, S) for j in range(0, best_w, S)]
    return np.stack([_resize(rgb_HW3, S, S)] + tiles)


def _to_rgb(image) -> tuple[np.ndarray, str]:
    if isinstance(image, (str, os.PathLike)):
        return _load_image_file(os.fspath(image)), os.fspath(image)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image), "<PIL image>"
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image), "<image array>"
    raise VisionInputError(f"unsupported image input type {type(image).__name__}")


def preprocess_image(image, cfg: LlavaOneVisionConfig, pcfg: LlavaPreprocessConfig | None = None, *,
                     anyres: bool = True) -> LlavaVisual:
    """One image (path, PIL image or uint8 HWC array) -> tiles. `anyres=False` for the images of a
    multi-image prompt (transformers patches only single-image prompts)."""
    pcfg = pcfg or LlavaPreprocessConfig()
    rgb, _ = _to_rgb(image)
    tiles = image_tiles_u8(rgb, cfg, pcfg, anyres)
    vis = LlavaVisual("image", _normalize(tiles, pcfg), (int(rgb.shape[0]), int(rgb.shape[1])), anyres)
    assert vis.pixel_values.shape[0] == num_tiles("image", cfg, image_hw=vis.image_size, anyres=anyres)
    return vis


def preprocess_video_frames(frames_THW3: np.ndarray, cfg: LlavaOneVisionConfig,
                            pcfg: LlavaPreprocessConfig | None = None) -> LlavaVisual:
    """uint8 RGB frames [T, H, W, 3] -> a video of T frames at S x S."""
    pcfg = pcfg or LlavaPreprocessConfig()
    frames = _as_rgb_frames(frames_THW3, "<frames array>")
    S = cfg.vision.image_size
    return LlavaVisual("video", _normalize(np.stack([_resize(f, S, S) for f in frames]), pcfg))


def video_frame_count(num_frames: int, cfg: LlavaOneVisionConfig, max_visual_tokens: int | None = None) -> int:
    """`num_frames`, cut so the video's tokens (frames x pooled grid + newline) fit `max_visual_tokens`."""
    if max_visual_tokens is None:
        return num_frames
    per_frame = num_visual_tokens("video", cfg, num_frames=1) - 1
    return max(1, min(num_frames, (max_visual_tokens - 1) // per_frame))


def preprocess_video(path, cfg: LlavaOneVisionConfig, pcfg: LlavaPreprocessConfig | None = None, *,
                     num_frames: int = 32, max_visual_tokens: int | None = None) -> LlavaVisual:
    """Decode a video file (PyAV), keep `num_frames` (cut to `max_visual_tokens`) frames evenly spaced
    in time, preprocess them. `summary` says what was applied."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    path = os.fspath(path)
    _check_regular_file(path)
    probe = _probe_video(path)
    n = min(video_frame_count(num_frames, cfg, max_visual_tokens), probe.total_frames)
    if probe.constant_rate:
        idx = np.linspace(0, probe.total_frames - 1, n).astype(np.int64)
    else:  # the same instants in presentation time: the frame on screen at each
        instants = np.linspace(0, probe.times_s[-1], n)
        idx = np.clip(np.searchsorted(probe.times_s, instants + 1e-9, side="right") - 1, 0, probe.total_frames - 1)
    vis = preprocess_video_frames(_decode_selected(path, idx), cfg, pcfg)
    S = cfg.vision.image_size
    summary = (f"{os.path.basename(path)}: {probe.duration_s:.1f} s, {probe.total_frames} frames "
               f"({'constant' if probe.constant_rate else 'variable'} frame rate); sampled {n} frames evenly "
               f"in {'frame index' if probe.constant_rate else 'presentation time'}"
               + (f" (cut from {num_frames} to fit {max_visual_tokens} visual tokens)" if n < min(num_frames, probe.total_frames) else "")
               + f"; frames {probe.width}x{probe.height} -> {S}x{S}; {vis.num_tokens(cfg)} visual tokens")
    return dataclasses.replace(vis, summary=summary)


# ------------------------------------------------------------------------------------------ prompt


def build_prompt(segments: Sequence, cfg: LlavaOneVisionConfig) -> LlavaPrompt:
    """Concatenate text-id segments and LlavaVisuals into one prompt. As transformers' processor:
    a prompt with one image patches it (anyres), a prompt with several images uses each image's base
    tile only — the visuals must have been preprocessed that way (ValueError otherwise)."""
    pads = (cfg.image_token_id, cfg.video_token_id)
    images = [s for s in segments if isinstance(s, LlavaVisual) and s.kind == "image"]
    for im in images:
        if im.anyres != (len(images) == 1):
            raise ValueError(f"a prompt with {len(images)} image(s) needs images preprocessed with "
                             f"anyres={len(images) == 1} (transformers patches single-image prompts only)")
    ids, types, visuals = [], [], []
    for i, seg in enumerate(segments):
        if isinstance(seg, LlavaVisual):
            n = seg.num_tokens(cfg)
            pad, code = (cfg.image_token_id, 1) if seg.kind == "image" else (cfg.video_token_id, 2)
            ids.append(np.full(n, pad))
            types.append(np.full(n, code))
            visuals.append(seg)
            continue
        seg = np.asarray(seg)
        if seg.ndim != 1 or (seg.size and not np.issubdtype(seg.dtype, np.integer)):
            raise ValueError(f"segment {i} must be a 1-D list of int token ids or a LlavaVisual")
        if np.isin(seg, pads).any():
            raise ValueError(f"text segment {i} contains raw image/video placeholder ids; pass a LlavaVisual")
        ids.append(seg)
        types.append(np.zeros(len(seg)))
    cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)  # noqa: E731
    return LlavaPrompt(cat(ids), cat(types), tuple(visuals))
