"""Qwen2.5-VL visual preprocessing in numpy + PyAV + PIL (no jax, no torch).

Reproduces the math of transformers' Qwen2-VL/Qwen2.5-VL processors (v5.23):

* ``smart_resize``      - ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``.
* image pixels          - ``Qwen2VLImageProcessorPil`` (the PIL backend): PIL BICUBIC resize of the
                          uint8 image, ``rescale`` (float64 multiply by 1/255, cast to float32), then
                          ``normalize`` ((x - mean) / std in float32), then patchify.
* video pixels          - the same per-frame pipeline applied to every sampled frame. NOTE: HF's own
                          ``Qwen2VLVideoProcessor`` resizes with torchvision, which is not bit-identical
                          to PIL; we deliberately use the PIL path for both images and videos so a video
                          frame is processed exactly like an image of that frame.
* frame sampling        - ``Qwen2VLVideoProcessor.sample_frames`` (fps-based rule, see
                          :func:`sample_frame_indices`) for constant-frame-rate video; variable-rate
                          video by presentation timestamps (:func:`sample_frame_times`).
* ``second_per_grid_t`` - ``Qwen2_5_VLProcessor._process_videos``: temporal_patch_size / sampled_fps
                          (sampled_fps = sampled frames / duration measured from the timestamps).
* total visual budget   - qwen-vl-utils' ``VIDEO_TOTAL_PIXELS`` / HF ``cap_pixels_per_frame`` (frames
                          capped at an even share), plus a hard ``max_visual_tokens`` that also drops
                          frames (:func:`fit_video_budget`).
* prompt layout         - ``<|vision_start|> + N * <|image_pad|/|video_pad|> + <|vision_end|>``;
                          ``mm_token_type_ids`` as ``ProcessorMixin.create_mm_token_type_ids`` (only the
                          pad tokens are typed 1/2, delimiters are text = 0).

Every problem with an input file raises :class:`VisionInputError` with a one-line message that
starts with the file path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
import PIL.Image
import PIL.ImageOps

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VisionInputError",
    "VisionPreprocessConfig",
    "DecodedVideo",
    "VisualInput",
    "VisionTokenIds",
    "MultimodalPrompt",
    "smart_resize",
    "default_max_visual_tokens",
    "num_sampled_frames",
    "sample_frame_indices",
    "sample_frame_times",
    "frame_size",
    "visual_tokens",
    "fit_video_budget",
    "read_video",
    "patchify",
    "preprocess_frames",
    "preprocess_image",
    "preprocess_video",
    "build_multimodal_prompt",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Share of the model's context a video may fill: qwen-vl-utils' VIDEO_TOTAL_PIXELS (128000 * 28 * 28 * 0.9
# for a 128k-context model) and transformers' `cap_pixels_per_frame` budget (0.9 x max_video_tokens).
VIDEO_CONTEXT_SHARE = 0.9

# Demuxers that FFmpeg uses for still images / text; PyAV happily "decodes" them as 1-frame videos.
_STILL_IMAGE_SUFFIX = "_pipe"  # png_pipe, jpeg_pipe, webp_pipe, bmp_pipe, ...
_NON_VIDEO_FORMATS = frozenset({"image2", "image2pipe", "tty", "apng"})


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class VisionInputError(ValueError):
    """A visual input (file, PIL image or array) cannot be used; message is one line naming it."""


def _one_line(text: object) -> str:
    """Collapse whitespace/newlines so error messages stay on a single line."""
    return " ".join(str(text).split())


def _input_error(source: object, problem: str, exc: BaseException | None = None) -> VisionInputError:
    """Build a one-line VisionInputError ``"<source>: <problem>[ (<ExcType>: <detail>)]"``."""
    msg = f"{source}: {problem}"
    if exc is not None:
        detail = _one_line(exc)
        msg += f" ({type(exc).__name__}: {detail})" if detail else f" ({type(exc).__name__})"
    return VisionInputError(_one_line(msg))


def _check_regular_file(path: str) -> None:
    """Raise VisionInputError for missing, non-regular or 0-byte files."""
    if not os.path.exists(path):
        raise _input_error(path, "file not found")
    if not os.path.isfile(path):
        raise _input_error(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise _input_error(path, "empty file (0 bytes)")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """Qwen2-VL / Qwen2.5-VL preprocessing hyper-parameters.

    Defaults are HF ``Qwen2VLImageProcessor`` image defaults (min_pixels=56*56,
    max_pixels=28*28*1280). HF's ``Qwen2VLVideoProcessor`` uses different pixel bounds
    (min_pixels=128*28*28, max_pixels=28*28*768): use :meth:`for_video` for those. The released
    Qwen2.5-VL checkpoints ship ``preprocessor_config.json`` with max_pixels=12845056; load it with
    :meth:`from_hf_preprocessor_json` to match a checkpoint exactly.

    Frame sampling (videos only): ``fps`` target sampling rate (None = keep every decoded frame,
    HF's ``do_sample_frames=False``), clamped to ``[min_frames, max_frames]``.
    ``cap_pixels_per_frame`` / ``max_video_tokens`` mirror HF's optional total-video pixel budget
    (each frame capped at an even share of 90 % of ``max_video_tokens`` tokens' pixels, floored at
    1.05 x ``min_pixels``: qwen-vl-utils' ``VIDEO_TOTAL_PIXELS`` rule). ``max_visual_tokens`` is a hard
    budget for one visual (ours): the same per-frame share of ``max_visual_tokens`` tokens' pixels, and
    where the pixel floor still overflows it, fewer frames (:func:`fit_video_budget`); images are
    shrunk to fit it too.

    :meth:`for_model` builds one from a target's vision config and its HF preprocessor JSON files.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    fps: float | None = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    max_visual_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "max_frames"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VisionPreprocessConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_visual_tokens is not None and self.max_visual_tokens <= 0:
            raise ValueError(f"VisionPreprocessConfig.max_visual_tokens must be positive, got {self.max_visual_tokens}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive or None, got {self.fps}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 entries (RGB)")
        # Normalise list inputs (e.g. from JSON) to tuples so the dataclass stays hashable.
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def factor(self) -> int:
        """Spatial resize granularity: patch_size * merge_size (28 for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    @property
    def video_pixel_budget(self) -> int | None:
        """Total pixels of one temporal group summed over a video (tokens x factor^2), or None: the
        hard budget ``max_visual_tokens``, else HF's ``cap_pixels_per_frame`` budget."""
        if self.max_visual_tokens is not None:
            return self.max_visual_tokens * self.factor * self.factor
        if self.cap_pixels_per_frame:
            return int(self.max_video_tokens * self.factor * self.factor * VIDEO_CONTEXT_SHARE)
        return None

    @classmethod
    def for_video(cls, **overrides) -> VisionPreprocessConfig:
        """HF ``Qwen2VLVideoProcessor`` defaults (min 128*28*28, max 768*28*28 pixels per frame)."""
        base = dict(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf_preprocessor_json(cls, path: str | os.PathLike, *, video: bool | None = None) -> VisionPreprocessConfig:
        """Read a HF ``preprocessor_config.json`` / ``video_preprocessor_config.json``.

        Known fields override the defaults (video defaults when ``video`` is True, or when None and
        the JSON declares a ``video_processor_type``). ``min_pixels``/``max_pixels`` win over
        ``size`` exactly like HF's ``__init__``. Unsupported switches (do_resize/do_rescale/
        do_normalize = false, non-bicubic resample) raise ValueError instead of being ignored.
        """
        data = _read_json(path)
        if video is None:
            video = "video_processor_type" in data
        return cls._build(path, video, _json_kwargs(path, data))

    @classmethod
    def for_model(cls, vision, *, video: bool, preprocessor_json: str | os.PathLike | None = None,
                  **overrides) -> VisionPreprocessConfig:
        """The preprocessing a target expects: patch / temporal patch / merge sizes from its vision config
        (``vision``: ``patch_size``, ``temporal_patch_size``, ``spatial_merge_size``), the rest from its
        HF ``preprocessor_json`` when given (a value there that contradicts the vision config is a
        ValueError naming the file and key), then ``overrides`` (e.g. CLI flags)."""
        model = {"patch_size": int(vision.patch_size), "temporal_patch_size": int(vision.temporal_patch_size),
                 "merge_size": int(vision.spatial_merge_size)}
        kwargs: dict = {}
        if preprocessor_json is not None:
            data = _read_json(preprocessor_json)
            kwargs = _json_kwargs(preprocessor_json, data)
            model_key = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
                         "merge_size": "spatial_merge_size"}
            for key, value in model.items():
                if key in kwargs and kwargs[key] != value:
                    raise ValueError(f"{preprocessor_json}: {key} {kwargs[key]} does not match the model's "
                                     f"vision_config.{model_key[key]} {value}")
        kwargs.update(model)
        kwargs.update(overrides)
        if "max_pixels" in overrides and "min_pixels" not in overrides:
            # a per-frame cap under the pixel floor lowers the floor with it
            floor = kwargs.get("min_pixels", (cls.for_video() if video else cls()).min_pixels)
            kwargs["min_pixels"] = min(floor, overrides["max_pixels"])
        return cls._build(preprocessor_json or "preprocessing", video, kwargs)

    @classmethod
    def _build(cls, source, video: bool, kwargs: dict) -> VisionPreprocessConfig:
        try:
            return cls.for_video(**kwargs) if video else cls(**kwargs)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def _read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(_one_line(f"{path}: cannot read preprocessor JSON ({type(exc).__name__}: {exc})")) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _json_kwargs(path, data: Mapping) -> dict:
    """VisionPreprocessConfig fields given by a HF preprocessor JSON dict (see from_hf_preprocessor_json)."""
    try:
        return _json_kwargs_unchecked(path, data)
    except (TypeError, ValueError, AttributeError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(_one_line(f"{path}: bad value ({type(exc).__name__}: {exc})")) from None


def _json_kwargs_unchecked(path, data: Mapping) -> dict:
    kwargs: dict = {}
    size = data.get("size") or {}
    if size.get("shortest_edge") is not None:
        kwargs["min_pixels"] = int(size["shortest_edge"])
    if size.get("longest_edge") is not None:
        kwargs["max_pixels"] = int(size["longest_edge"])
    for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                "min_frames", "max_frames", "max_video_tokens"):
        if data.get(key) is not None:
            kwargs[key] = int(data[key])
    for key in ("image_mean", "image_std"):
        if data.get(key) is not None:
            kwargs[key] = tuple(float(v) for v in data[key])
    if data.get("rescale_factor") is not None:
        kwargs["rescale_factor"] = float(data["rescale_factor"])
    if "fps" in data:
        kwargs["fps"] = None if data["fps"] is None else float(data["fps"])
    if data.get("do_sample_frames") is False and "fps" not in data:
        kwargs["fps"] = None
    if data.get("cap_pixels_per_frame") is not None:
        kwargs["cap_pixels_per_frame"] = bool(data["cap_pixels_per_frame"])
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if data.get(flag) is False:
            raise ValueError(f"{path}: {flag}=false is not supported")
    if data.get("resample", 3) != 3:  # PILImageResampling.BICUBIC
        raise ValueError(f"{path}: only bicubic resample (3) is supported, got {data['resample']}")
    return kwargs


def default_max_visual_tokens(context_len: int) -> int:
    """qwen-vl-utils' total video budget for a model of ``context_len`` positions, in visual tokens."""
    return int(context_len * VIDEO_CONTEXT_SHARE)


# ----------------------------------------------------------------------------------------------
# Geometry and sampling
# ----------------------------------------------------------------------------------------------


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """HF Qwen2-VL ``smart_resize``: nearest (h, w) divisible by ``factor`` with area in bounds.

    Rounds each side to the nearest multiple of ``factor``; if the area exceeds ``max_pixels`` it
    scales down (floor), if below ``min_pixels`` it scales up (ceil), keeping the aspect ratio.
    Raises ValueError for aspect ratios above 200 (as HF does) or non-positive sizes.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)} "
            f"(height={height}, width={width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_sampled_frames(total_frames: int, video_fps: float, cfg: VisionPreprocessConfig) -> int:
    """How many frames the fps rule keeps (see :func:`sample_frame_indices`); at least
    ``temporal_patch_size`` (a shorter video repeats its last frame)."""
    total_frames = int(total_frames)
    tp = cfg.temporal_patch_size
    if total_frames <= 0:
        raise ValueError(f"total_frames must be positive, got {total_frames}")
    if cfg.fps is None:
        return total_frames
    if total_frames < tp:
        return tp
    if not video_fps or video_fps <= 0:
        raise ValueError(f"video_fps must be positive for fps-based sampling, got {video_fps}")
    max_frames = math.floor(min(cfg.max_frames, total_frames) / tp) * tp
    num = total_frames / video_fps * cfg.fps
    num = min(max(num, cfg.min_frames), max_frames, total_frames)
    return max(tp, math.floor(num / tp) * tp)


def sample_frame_indices(total_frames: int, video_fps: float, cfg: VisionPreprocessConfig,
                         num_frames: int | None = None) -> np.ndarray:
    """Indices of the frames to keep, following HF ``Qwen2VLVideoProcessor.sample_frames`` (fps mode).

    With ``tp = cfg.temporal_patch_size``::

        max_frames = floor(min(cfg.max_frames, total_frames) / tp) * tp
        n = total_frames / video_fps * cfg.fps
        n = min(max(n, cfg.min_frames), max_frames, total_frames)
        n = floor(n / tp) * tp
        indices[i] = int(float32(i * (total_frames / n)))   for i in range(n)

    i.e. HF's ``torch.arange(0, total, total / n).int()`` (float32 values, truncation). Deviations,
    both where HF misbehaves:

    * HF's arange sometimes yields n + 1 values whose extra last value equals ``total_frames`` (out of
      range, a float round-off in ``total / (total / n)``); we always return exactly n indices
      (identical to HF's first n).
    * if ``total_frames < tp`` HF divides by zero; we return every frame and repeat the last one up
      to ``tp`` indices (e.g. a 1-frame video gives ``[0, 0]``). Likewise n is never below ``tp``.

    ``cfg.fps is None`` keeps every frame (HF ``do_sample_frames=False``); :func:`patchify` then
    pads the frame count to a multiple of ``tp`` by repeating the last frame. ``num_frames`` replaces
    the rule's count (a visual-token budget may ask for fewer frames), spread the same way.
    """
    total_frames = int(total_frames)
    tp = cfg.temporal_patch_size
    num = num_sampled_frames(total_frames, video_fps, cfg) if num_frames is None else int(num_frames)
    if cfg.fps is None and num == total_frames:
        return np.arange(total_frames, dtype=np.int64)
    if total_frames < tp:
        indices = np.arange(total_frames, dtype=np.int64)
        return np.concatenate([indices, np.full(tp - total_frames, total_frames - 1, dtype=np.int64)])
    step = total_frames / num
    values_f32 = (np.arange(num, dtype=np.float64) * step).astype(np.float32)
    return np.minimum(values_f32.astype(np.int64), total_frames - 1)


def sample_frame_times(times_s: np.ndarray, duration_s: float, num_frames: int) -> np.ndarray:
    """Variable-frame-rate video: indices of the frames on screen at ``num_frames`` evenly spaced
    instants ``k * duration_s / num_frames`` (the frame whose presentation time is the latest at or
    before each instant) — HF's index rule carried over to presentation time. ``times_s``: sorted
    presentation times from the first frame (0.0). A frame shown longer than the spacing repeats."""
    instants = np.arange(int(num_frames), dtype=np.float64) * (float(duration_s) / int(num_frames))
    idx = np.searchsorted(np.asarray(times_s, np.float64), instants + 1e-9, side="right") - 1
    return np.clip(idx, 0, len(times_s) - 1).astype(np.int64)


def frame_size(height: int, width: int, num_frames: int, cfg: VisionPreprocessConfig,
               kind: str = "video") -> tuple[int, int]:
    """smart_resize target of every frame: cfg's pixel bounds; a video's frames capped at an even share
    of ``cfg.video_pixel_budget`` floored at 1.05 x min_pixels (HF ``cap_pixels_per_frame`` /
    qwen-vl-utils); an image shrunk to ``cfg.max_visual_tokens`` (one temporal group)."""
    min_pixels, max_pixels, f = cfg.min_pixels, cfg.max_pixels, cfg.factor
    budget = cfg.video_pixel_budget
    if kind == "video" and budget is not None:
        max_pixels = max(min(max_pixels, budget * cfg.temporal_patch_size // max(num_frames, 1)),
                         int(min_pixels * 1.05))
    elif kind == "image" and cfg.max_visual_tokens is not None:
        max_pixels = min(max_pixels, cfg.max_visual_tokens * f * f)
        min_pixels = min(min_pixels, max_pixels)
    return smart_resize(height, width, factor=f, min_pixels=min_pixels, max_pixels=max_pixels)


def visual_tokens(num_frames: int, size_hw: tuple[int, int], cfg: VisionPreprocessConfig) -> int:
    """LLM placeholder tokens of ``num_frames`` frames of ``size_hw`` pixels (frames padded to whole
    temporal groups)."""
    groups = -(-int(num_frames) // cfg.temporal_patch_size)
    return groups * (size_hw[0] // cfg.patch_size) * (size_hw[1] // cfg.patch_size) // cfg.merge_size**2


def fit_video_budget(num_frames: int, height: int, width: int,
                     cfg: VisionPreprocessConfig) -> tuple[int, tuple[int, int]]:
    """(frames, frame size) for ``num_frames`` sampled frames of height x width within
    ``cfg.max_visual_tokens``: frames shrink first (:func:`frame_size`); where the pixel floor still
    overflows the budget, whole temporal groups of frames are dropped (the rest spread over the video
    as before); a single group still too large shrinks below the floor."""
    size = frame_size(height, width, num_frames, cfg)
    budget, tp = cfg.max_visual_tokens, cfg.temporal_patch_size
    if budget is None:
        return num_frames, size
    n = num_frames
    while n > tp and visual_tokens(n, size, cfg) > budget:
        per_group = visual_tokens(tp, size, cfg)
        n = max(tp, min(n - tp, budget // per_group * tp))
        size = frame_size(height, width, n, cfg)
    if visual_tokens(n, size, cfg) > budget:
        f = cfg.factor
        size = smart_resize(height, width, factor=f, min_pixels=f * f, max_pixels=budget * f * f)
    return n, size


# ----------------------------------------------------------------------------------------------
# Video decoding
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DecodedVideo:
    """Sampled RGB frames of a video plus the timing metadata Qwen2.5-VL needs.

    ``frames``: uint8 [T, H, W, 3] for ``frame_indices`` (T == len(frame_indices), may repeat for
    videos shorter than temporal_patch_size, or for frames shown longer than the sampling interval).
    ``frame_times_s``: their presentation times. ``video_fps``: the container frame rate (constant
    rate) or frames / duration (variable rate). ``duration_s``: total_frames / video_fps (constant
    rate) or measured from presentation timestamps. ``sampled_fps = T / duration_s`` and
    ``second_per_grid_t = temporal_patch_size / sampled_fps`` — for a constant-rate video exactly HF's
    ``VideoMetadata.sampled_fps`` / ``Qwen2_5_VLProcessor`` ``second_per_grid_ts``. ``rule_frames``:
    what the fps rule asked for before a visual-token budget (``cfg.max_visual_tokens``) cut it;
    ``size_hw`` the decoded frame size and ``resized_hw`` the size every frame is resized to.
    """

    path: str
    frames: np.ndarray
    frame_indices: np.ndarray
    total_frames: int
    video_fps: float
    duration_s: float
    sampled_fps: float
    second_per_grid_t: float
    frame_times_s: np.ndarray | None = None
    constant_rate: bool = True
    rule_frames: int = 0
    size_hw: tuple[int, int] = (0, 0)
    resized_hw: tuple[int, int] = (0, 0)

    def summary(self, cfg: VisionPreprocessConfig) -> str:
        """One line: what sampling and resizing were applied."""
        n = len(self.frame_indices)
        rate = "constant" if self.constant_rate else "variable"
        out = (f"{os.path.basename(self.path)}: {self.duration_s:.1f} s, {self.total_frames} frames "
               f"({rate} frame rate, {self.video_fps:.2f} fps); sampled {n} frames at {self.sampled_fps:.2f} fps "
               f"by {'frame index' if self.constant_rate else 'presentation time'}")
        if self.rule_frames and n < self.rule_frames:
            out += f" (the {cfg.fps} fps rule gave {self.rule_frames}; cut to fit {cfg.max_visual_tokens} visual tokens)"
        out += (f"; frames {self.size_hw[1]}x{self.size_hw[0]} -> {self.resized_hw[1]}x{self.resized_hw[0]}; "
                f"{visual_tokens(n, self.resized_hw, cfg)} visual tokens")
        if cfg.max_visual_tokens is not None:
            out += f" (budget {cfg.max_visual_tokens})"
        return out


@dataclass(frozen=True, eq=False)
class VideoProbe:
    """A first decode pass: frame count, presentation times (s, from the first frame), frame size."""

    total_frames: int
    video_fps: float
    times_s: np.ndarray
    duration_s: float
    constant_rate: bool
    height: int
    width: int


def _open_container(path: str):
    """av.open with every failure mapped to VisionInputError."""
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except Exception as exc:  # PyAV raises many FFmpegError/OSError subclasses; none may escape raw.
        raise _input_error(path, "cannot open as a video container", exc) from None


def _select_video_stream(container, path: str):
    """First real video stream (not cover art); rejects still-image/text demuxers."""
    fmt_name = container.format.name
    if fmt_name.endswith(_STILL_IMAGE_SUFFIX) or fmt_name in _NON_VIDEO_FORMATS:
        raise _input_error(path, f"not a video (FFmpeg detected a still image/text format '{fmt_name}')")
    attached_pic = int(getattr(getattr(av.stream, "Disposition", None), "attached_pic", 1024))
    streams = [s for s in container.streams.video if not int(s.disposition) & attached_pic]
    if not streams:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise _input_error(path, f"contains no video stream (stream types: {kinds})")
    stream = streams[0]
    stream.thread_type = "AUTO"
    return stream


def _stream_fps(stream, container, total_frames: int, path: str) -> float:
    """Container frame rate: average_rate, guessed_rate, base_rate, else frames / duration."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    if container.duration and container.duration > 0:
        return total_frames / (container.duration / 1_000_000)
    raise _input_error(path, "cannot determine the video frame rate")


def _timing(times: list, total: int, rate: float) -> tuple[np.ndarray, float, float, bool]:
    """(times_s, video_fps, duration_s, constant_rate) from the decoded frames' presentation times
    (None where a container has none: then frames are taken as ``rate`` apart). Intervals within 2 %
    of their mean (or a timestamp tick) count as a constant rate, which keeps HF's index arithmetic."""
    if total < 2 or any(t is None for t in times) or any(b < a for a, b in zip(times, times[1:])):
        return np.arange(total, dtype=np.float64) / rate, rate, total / rate, True
    t_s = np.asarray(times, np.float64) - float(times[0])
    d_s = np.diff(t_s)
    mean = float(d_s.mean())
    if mean > 0 and np.all(np.abs(d_s - mean) <= max(0.02 * mean, 1e-3)):
        if abs(mean * rate - 1) > 0.02:  # the container's rate contradicts its timestamps: trust the latter
            rate = 1 / mean
        return t_s, rate, total / rate, True
    duration = float(t_s[-1] + (d_s[-1] if d_s[-1] > 0 else mean))
    return t_s, total / duration, duration, False


def _probe_video(path: str) -> VideoProbe:
    """Decode the whole video stream once (container frame counts can be wrong): frame count,
    presentation times, frame size."""
    container = _open_container(path)
    try:
        stream = _select_video_stream(container, path)
        times, size = [], None
        try:
            for frame in container.decode(stream):
                times.append(frame.time)
                if size is None:
                    size = (int(frame.height), int(frame.width))
        except Exception as exc:
            raise _input_error(path, f"corrupt video data (decoding failed after {len(times)} frames)", exc) from None
        if not times:
            raise _input_error(path, "video stream has zero decodable frames")
        rate = _stream_fps(stream, container, len(times), path)
    finally:
        container.close()
    t_s, video_fps, duration, constant = _timing(times, len(times), rate)
    return VideoProbe(len(times), video_fps, t_s, duration, constant, *size)


def _decode_selected(path: str, indices: np.ndarray) -> np.ndarray:
    """Second decode pass keeping only ``indices`` (may repeat) as uint8 [T, H, W, 3] RGB."""
    positions: dict[int, list[int]] = {}
    for pos, idx in enumerate(indices.tolist()):
        positions.setdefault(int(idx), []).append(pos)
    last_needed = max(positions)
    frames_THW3: np.ndarray | None = None
    filled = 0
    container = _open_container(path)
    try:
        stream = _select_video_stream(container, path)
        frame_idx = -1
        try:
            for frame_idx, frame in enumerate(container.decode(stream)):
                if frame_idx in positions:
                    if frames_THW3 is None:
                        rgb_HW3 = frame.to_ndarray(format="rgb24")
                        frames_THW3 = np.empty((len(indices), *rgb_HW3.shape), dtype=np.uint8)
                    else:  # keep a fixed size even if the stream changes resolution mid-way
                        height, width = frames_THW3.shape[1:3]
                        rgb_HW3 = frame.to_ndarray(format="rgb24", width=width, height=height)
                    for pos in positions[frame_idx]:
                        frames_THW3[pos] = rgb_HW3
                        filled += 1
                if frame_idx >= last_needed:
                    break
        except Exception as exc:
            problem = f"corrupt video data (decoding failed after {frame_idx + 1} frames)"
            raise _input_error(path, problem, exc) from None
    finally:
        container.close()
    if frames_THW3 is None or filled != len(indices):
        raise _input_error(path, f"video decoded to fewer frames than on the first pass (needed index {last_needed})")
    return frames_THW3


def read_video(path: str | os.PathLike, cfg: VisionPreprocessConfig | None = None) -> DecodedVideo:
    """Decode a video file (mp4/webm/mkv/...) with PyAV and keep only the sampled frames.

    A first pass decodes every frame (:func:`_probe_video`: count, presentation times, size); the
    frame count follows the fps rule (:func:`num_sampled_frames`), cut to ``cfg.max_visual_tokens``
    (:func:`fit_video_budget`); a constant-rate video is sampled by frame index exactly as HF
    (:func:`sample_frame_indices`), a variable-rate one by presentation time
    (:func:`sample_frame_times`). A second pass decodes up to the last sampled frame and converts only
    sampled frames to RGB (``frame.to_ndarray(format="rgb24")``, as HF's PyAV loader does). Decode
    errors anywhere in the stream are treated as a corrupt file. Rotation metadata is ignored (as in HF).
    """
    cfg = VisionPreprocessConfig.for_video() if cfg is None else cfg
    path = os.fspath(path)
    _check_regular_file(path)
    probe = _probe_video(path)
    rule = num_sampled_frames(probe.total_frames, probe.video_fps, cfg)
    try:
        num, resized_hw = fit_video_budget(rule, probe.height, probe.width, cfg)
    except ValueError as exc:  # e.g. aspect ratio > 200
        raise _input_error(path, "cannot preprocess video", exc) from None
    if probe.constant_rate:
        indices = sample_frame_indices(probe.total_frames, probe.video_fps, cfg, num_frames=num)
    else:
        indices = sample_frame_times(probe.times_s, probe.duration_s, num)
    frames_THW3 = _decode_selected(path, indices)
    sampled_fps = len(indices) / probe.duration_s
    return DecodedVideo(
        path=path,
        frames=frames_THW3,
        frame_indices=indices,
        total_frames=probe.total_frames,
        video_fps=probe.video_fps,
        duration_s=probe.duration_s,
        sampled_fps=sampled_fps,
        second_per_grid_t=cfg.temporal_patch_size / sampled_fps,
        frame_times_s=probe.times_s[indices],
        constant_rate=probe.constant_rate,
        rule_frames=rule,
        size_hw=(probe.height, probe.width),
        resized_hw=resized_hw,
    )


# ----------------------------------------------------------------------------------------------
# Pixels -> patches
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VisualInput:
    """One preprocessed image or video, ready for the vision tower.

    ``pixel_values``: float32 [t*h*w, C*tp*p*p] in HF's flattened patch order; ``grid_thw``:
    (t, h, w) in patches; ``second_per_grid_t``: seconds per temporal grid step (videos; 1.0 and
    unused for images); ``num_tokens``: LLM placeholder tokens = t*h*w // merge_size**2.
    """

    kind: Literal["image", "video"]
    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float = 1.0
    merge_size: int = 2
    summary: str = ""  # one line: the sampling and resizing applied (files), for logs

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise ValueError(f"VisualInput.kind must be 'image' or 'video', got {self.kind!r}")
        grid_thw = tuple(int(v) for v in self.grid_thw)
        if len(grid_thw) != 3 or min(grid_thw) <= 0:
            raise ValueError(f"grid_thw must be 3 positive ints, got {self.grid_thw}")
        object.__setattr__(self, "grid_thw", grid_thw)
        t, h, w = grid_thw
        if self.pixel_values.ndim != 2 or self.pixel_values.shape[0] != t * h * w:
            raise ValueError(f"pixel_values shape {self.pixel_values.shape} does not match grid_thw {grid_thw}")
        if h % self.merge_size or w % self.merge_size:
            raise ValueError(f"grid h/w {grid_thw[1:]} must be divisible by merge_size {self.merge_size}")

    @property
    def num_tokens(self) -> int:
        """Number of <|image_pad|>/<|video_pad|> placeholders this visual occupies in the prompt."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


def patchify(frames_THWC: np.ndarray, cfg: VisionPreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flatten normalized float32 frames [T, H, W, C] into Qwen2-VL patch rows.

    Rows are ordered (t, h-block, w-block, mh, mw); each row is the (C, tp, ph, pw) patch flattened,
    matching HF ``Qwen2VLImageProcessorPil.patchify`` / ``Qwen2VLVideoProcessor.patchify``. T is padded
    to a multiple of temporal_patch_size by repeating the last frame (an image is T=1, so its single
    frame fills every temporal slot). H and W must be multiples of patch_size * merge_size.
    """
    frames_THWC = np.asarray(frames_THWC, dtype=np.float32)
    if frames_THWC.ndim != 4 or frames_THWC.shape[0] == 0:
        raise ValueError(f"patchify expects [T, H, W, C] with T >= 1, got shape {frames_THWC.shape}")
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    num_frames, height, width, channels = frames_THWC.shape
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {height}x{width} is not a multiple of patch_size*merge_size={p * m}")
    if pad := -num_frames % tp:
        frames_THWC = np.concatenate([frames_THWC, np.repeat(frames_THWC[-1:], pad, axis=0)], axis=0)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // tp, height // p, width // p
    x = frames_THWC.reshape(grid_t, tp, grid_h // m, m, p, grid_w // m, m, p, channels)
    # (gt, tp, GH, mh, ph, GW, mw, pw, C) -> (gt, GH, GW, mh, mw, C, tp, ph, pw)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    pixel_values = np.ascontiguousarray(x).reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return pixel_values, (grid_t, grid_h, grid_w)


def _resize_u8(frame_HW3: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL BICUBIC resize of a uint8 RGB frame (what HF's PIL backend ``resize`` does)."""
    image = PIL.Image.fromarray(frame_HW3)
    return np.asarray(image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC))


def _rescale_normalize(frames_u8: np.ndarray, cfg: VisionPreprocessConfig) -> np.ndarray:
    """HF ``rescale`` (float64 * factor -> float32) then ``normalize`` ((x - mean) / std, float32)."""
    x_f32 = (frames_u8.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean_f32 = np.asarray(cfg.image_mean, dtype=np.float32)
    std_f32 = np.asarray(cfg.image_std, dtype=np.float32)
    return (x_f32 - mean_f32) / std_f32


def _preprocess_u8(
    frames_THW3: np.ndarray, cfg: VisionPreprocessConfig, kind: Literal["image", "video"], second_per_grid_t: float,
    size_hw: tuple[int, int] | None = None, summary: str = "",
) -> VisualInput:
    """Resize (to ``size_hw``, default :func:`frame_size`) + rescale + normalize + patchify, one
    temporal group at a time (bounded memory)."""
    num_frames, height, width = frames_THW3.shape[:3]
    res_h, res_w = size_hw or frame_size(height, width, num_frames, cfg, kind)
    tp, p = cfg.temporal_patch_size, cfg.patch_size
    grid_t = -(-num_frames // tp)
    rows_per_t = (res_h // p) * (res_w // p)
    pixel_values = np.empty((grid_t * rows_per_t, 3 * tp * p * p), dtype=np.float32)
    for g in range(grid_t):
        group_u8 = np.stack([_resize_u8(f, res_h, res_w) for f in frames_THW3[g * tp : (g + 1) * tp]])
        rows, _ = patchify(_rescale_normalize(group_u8, cfg), cfg)
        pixel_values[g * rows_per_t : (g + 1) * rows_per_t] = rows
    grid_thw = (grid_t, res_h // p, res_w // p)
    return VisualInput(kind, pixel_values, grid_thw, float(second_per_grid_t), cfg.merge_size, summary)


def _as_rgb_frames(frames: np.ndarray, source: str) -> np.ndarray:
    """Validate uint8 [T, H, W, 3] RGB frames."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise _input_error(source, f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return np.ascontiguousarray(frames)


def preprocess_frames(
    frames: np.ndarray, cfg: VisionPreprocessConfig | None = None, *, second_per_grid_t: float = 1.0
) -> VisualInput:
    """Preprocess uint8 RGB video frames [T, H, W, 3] into a 'video' VisualInput.

    All frames share one smart_resize target. T is padded to a multiple of temporal_patch_size by
    repeating the last frame. Pass ``second_per_grid_t`` (from :class:`DecodedVideo`) if known.
    """
    cfg = VisionPreprocessConfig.for_video() if cfg is None else cfg
    frames_THW3 = _as_rgb_frames(frames, "<frames array>")
    return _preprocess_u8(frames_THW3, cfg, "video", second_per_grid_t)


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """HF ``convert_to_rgb`` for PIL: composite any transparency onto white, then RGB uint8."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """HF ``convert_to_rgb`` for uint8 HWC arrays: gray repeated, RGBA blended onto white."""
    if array.dtype != np.uint8:
        raise _input_error("<image array>", f"expected a uint8 array, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise _input_error("<image array>", f"expected [H, W], [H, W, 1|3|4], got shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _load_image_file(path: str) -> np.ndarray:
    """HF ``load_image`` for a path: PIL open, EXIF transpose, ``convert('RGB')``."""
    _check_regular_file(path)
    try:
        with PIL.Image.open(path) as image:
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except Exception as exc:  # PIL raises UnidentifiedImageError/OSError/SyntaxError/...; none may escape raw.
        raise _input_error(path, "cannot open as an image", exc) from None


def preprocess_image(
    image: str | os.PathLike | PIL.Image.Image | np.ndarray, cfg: VisionPreprocessConfig | None = None
) -> VisualInput:
    """Preprocess one image (file path, PIL image or uint8 HWC array) into an 'image' VisualInput.

    Paths follow HF ``load_image`` (EXIF transpose + convert('RGB')); PIL images and arrays follow
    the processor's ``convert_to_rgb`` (alpha composited onto white). Pixels then match
    ``Qwen2VLImageProcessorPil`` to float32 round-off (grid_t = 1).
    """
    cfg = VisionPreprocessConfig() if cfg is None else cfg
    if isinstance(image, (str, os.PathLike)):
        rgb_HW3 = _load_image_file(os.fspath(image))
        source = os.fspath(image)
    elif isinstance(image, PIL.Image.Image):
        try:
            rgb_HW3 = _pil_to_rgb(image)
        except Exception as exc:
            raise _input_error("<PIL image>", "cannot convert to RGB", exc) from None
        source = "<PIL image>"
    elif isinstance(image, np.ndarray):
        rgb_HW3 = _array_to_rgb(image)
        source = "<image array>"
    else:
        raise VisionInputError(f"unsupported image input type {type(image).__name__}")
    try:
        height, width = rgb_HW3.shape[:2]
        size_hw = frame_size(height, width, 1, cfg, "image")
        summary = (f"{os.path.basename(source)}: image {width}x{height} -> {size_hw[1]}x{size_hw[0]}; "
                   f"{visual_tokens(1, size_hw, cfg)} visual tokens"
                   + (f" (budget {cfg.max_visual_tokens})" if cfg.max_visual_tokens is not None else ""))
        return _preprocess_u8(rgb_HW3[None], cfg, "image", 1.0, size_hw, summary)
    except ValueError as exc:  # e.g. aspect ratio > 200
        if isinstance(exc, VisionInputError):
            raise
        raise _input_error(source, "cannot preprocess image", exc) from None


def preprocess_video(path: str | os.PathLike, cfg: VisionPreprocessConfig | None = None) -> VisualInput:
    """Decode + sample (:func:`read_video`) then preprocess into a 'video' VisualInput.

    ``cfg`` defaults to :meth:`VisionPreprocessConfig.for_video` (HF video-processor pixel bounds).
    """
    cfg = VisionPreprocessConfig.for_video() if cfg is None else cfg
    video = read_video(path, cfg)
    try:
        return _preprocess_u8(video.frames, cfg, "video", video.second_per_grid_t, video.resized_hw,
                              video.summary(cfg))
    except ValueError as exc:
        if isinstance(exc, VisionInputError):
            raise
        raise _input_error(video.path, "cannot preprocess video", exc) from None


# ----------------------------------------------------------------------------------------------
# Prompt layout
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionTokenIds:
    """Special token ids delimiting visual placeholders (Qwen2.5-VL defaults in :meth:`qwen2_5_vl`)."""

    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int

    @classmethod
    def from_config(cls, config: Mapping) -> VisionTokenIds:
        """From a HF config dict (config.json): vision_start/end_token_id, image/video_token_id.

        Keys are looked up at top level, then in ``text_config``.
        """
        keys = {
            "vision_start": "vision_start_token_id",
            "vision_end": "vision_end_token_id",
            "image_pad": "image_token_id",
            "video_pad": "video_token_id",
        }
        nested = config.get("text_config") or {}
        values = {}
        for attr, key in keys.items():
            value = config.get(key, nested.get(key))
            if value is None:
                raise KeyError(f"config has no '{key}'")
            values[attr] = int(value)
        return cls(**values)

    @classmethod
    def qwen2_5_vl(cls) -> VisionTokenIds:
        """Token ids of the released Qwen2-VL / Qwen2.5-VL tokenizers."""
        return cls(vision_start=151652, vision_end=151653, image_pad=151655, video_pad=151656)


@dataclass(frozen=True, eq=False)
class MultimodalPrompt:
    """Token ids with expanded visual placeholders.

    ``input_ids``: int32 [T]; ``mm_token_type_ids``: int32 [T], 0 text (incl. vision start/end),
    1 image pad, 2 video pad; ``visuals``: VisualInputs in prompt order.
    """

    input_ids: np.ndarray
    mm_token_type_ids: np.ndarray
    visuals: tuple[VisualInput, ...]

    @property
    def image_grid_thw(self) -> np.ndarray:
        """int64 [num_images, 3] grids of the images, in order."""
        return np.array([v.grid_thw for v in self.visuals if v.kind == "image"], dtype=np.int64).reshape(-1, 3)

    @property
    def video_grid_thw(self) -> np.ndarray:
        """int64 [num_videos, 3] grids of the videos, in order."""
        return np.array([v.grid_thw for v in self.visuals if v.kind == "video"], dtype=np.int64).reshape(-1, 3)

    @property
    def second_per_grid_ts(self) -> np.ndarray:
        """float32 [num_videos] seconds per temporal grid step of each video."""
        return np.array([v.second_per_grid_t for v in self.visuals if v.kind == "video"], dtype=np.float32)


def build_multimodal_prompt(
    segments: Sequence[Sequence[int] | np.ndarray | VisualInput], token_ids: VisionTokenIds
) -> MultimodalPrompt:
    """Concatenate text-id segments and visuals into one prompt.

    Each VisualInput becomes ``vision_start + num_tokens * (image_pad|video_pad) + vision_end``.
    Text segments must not contain raw image/video pad ids (they would desynchronise the placeholder
    count from the visuals); ValueError otherwise.
    """
    pad_ids = (token_ids.image_pad, token_ids.video_pad)
    ids_parts: list[np.ndarray] = []
    type_parts: list[np.ndarray] = []
    visuals: list[VisualInput] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, VisualInput):
            pad, mm_type = (token_ids.image_pad, 1) if seg.kind == "image" else (token_ids.video_pad, 2)
            n = seg.num_tokens
            ids = np.concatenate([[token_ids.vision_start], np.full(n, pad), [token_ids.vision_end]])
            types = np.zeros(n + 2, dtype=np.int32)
            types[1:-1] = mm_type
            visuals.append(seg)
        else:
            ids = np.asarray(seg)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(f"segment {i} must be a 1-D list of int token ids or a VisualInput")
            if np.isin(ids, pad_ids).any():
                raise ValueError(f"text segment {i} contains raw image/video pad token ids; pass a VisualInput")
            types = np.zeros(ids.shape[0], dtype=np.int32)
        ids_parts.append(ids.astype(np.int64))
        type_parts.append(types)
    input_ids = np.concatenate(ids_parts).astype(np.int32) if ids_parts else np.zeros(0, np.int32)
    mm_types = np.concatenate(type_parts) if type_parts else np.zeros(0, np.int32)
    return MultimodalPrompt(input_ids=input_ids, mm_token_type_ids=mm_types, visuals=tuple(visuals))
