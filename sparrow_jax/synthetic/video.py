"""Procedural videos: coloured shapes moving over a plain background, encoded to real files with
PyAV. The seed of the shipped tiny video world (SPEC §7); today it gives `decode.py` a real video to
read without any download."""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "white": (240, 240, 240), "purple": (150, 60, 200)}


@dataclasses.dataclass(frozen=True)
class MovingObject:
    colour: str
    shape: str  # "square" | "disc"
    size: int  # pixels
    start: tuple[float, float]  # (y, x) in [0, 1]
    velocity: tuple[float, float]  # (dy, dx) per second, in frame units; bounces at the borders


def random_scene(rng: np.random.Generator, num_objects: int = 2) -> list[MovingObject]:
    names = list(COLOURS)
    return [MovingObject(colour=names[rng.integers(len(names))], shape=("square", "disc")[rng.integers(2)],
                         size=int(rng.integers(12, 32)), start=tuple(rng.uniform(0.1, 0.9, 2)),
                         velocity=tuple(rng.uniform(-0.4, 0.4, 2))) for _ in range(num_objects)]


def render_frames(objects, *, num_frames: int, fps: float, height: int, width: int, background=(20, 20, 30)):
    """uint8 [T, H, W, 3] frames of the scene."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        f = np.empty((height, width, 3), np.uint8)
        f[:] = background
        for o in objects:
            # Bounce: reflect the unbounded trajectory into [0, 1].
            p = (np.asarray(o.start) + np.asarray(o.velocity) * t / fps) % 2.0
            p = np.where(p > 1.0, 2.0 - p, p)
            cy, cx = p[0] * (height - 1), p[1] * (width - 1)
            r = o.size / 2
            if o.shape == "square":
                m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            else:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            f[m] = COLOURS[o.colour]
        frames[t] = f
    return frames


def _encode(target, frames_THW3: np.ndarray, fps: float, codec: str, options: dict | None, fmt: str | None) -> None:
    T, H, W, _ = frames_THW3.shape
    with av.open(target, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=options or {})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for f in frames_THW3:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(path, frames_THW3: np.ndarray, fps: float = 8, codec: str = "mpeg4",
                options: dict | None = None) -> Path:
    """Encode uint8 RGB frames to `path` (container from the suffix: .mp4/.mkv/.webm); `options` are
    the encoder's (e.g. {"crf": "18"} for libx264)."""
    path = Path(path)
    _encode(str(path), frames_THW3, fps, codec, options, None)
    return path


def codec_roundtrip(frames_THW3: np.ndarray, fps: float, codec: str = "mpeg4", options: dict | None = None) -> np.ndarray:
    """Frames after an in-memory mp4 encode + decode with the same settings as `write_video` (what a
    model reading the file sees), without touching the disk."""
    buf = io.BytesIO()
    _encode(buf, frames_THW3, fps, codec, options, "mp4")
    buf.seek(0)
    with av.open(buf, "r") as container:
        out = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    if out.shape != frames_THW3.shape:
        raise ValueError(f"codec round trip changed the frames' shape {frames_THW3.shape} -> {out.shape}")
    return out


def demo_video(path, *, seed: int = 0, seconds: float = 4.0, fps: float = 8, height: int = 224, width: int = 224):
    """A short random scene written to `path`; returns (path, scene)."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, num_objects=int(rng.integers(1, 4)))
    frames = render_frames(scene, num_frames=int(seconds * fps), fps=fps, height=height, width=width)
    return write_video(path, frames, fps), scene
