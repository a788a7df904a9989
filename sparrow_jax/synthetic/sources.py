"""Sample sources by name — what the training config's `data` field selects — and the learnable colour
task that the target-training tests use (small and fast; the shipped target trains on "world").

A source is a callable `(target_cfg, n, *, seed) -> list[training.data.Sample]`; `data` is a name in
SOURCES or a "module:function" path, so a new generator plugs in without touching the trainers.
"""

from __future__ import annotations

import importlib

import numpy as np

from sparrow_jax.io.vision_inputs import VisionPreprocessConfig, VisionTokenIds, build_multimodal_prompt, \
    preprocess_frames
from sparrow_jax.synthetic.video import COLOURS, MovingObject, render_frames
from sparrow_jax.training.data import Sample

SOURCES = {
    "synthetic": "sparrow_jax.synthetic.samples:synthetic_samples",  # random text around a video (drafts)
    "colours": "sparrow_jax.synthetic.sources:colour_samples",  # answer = the object's colour (learnable)
    "colours_short": "sparrow_jax.synthetic.sources:short_colour_samples",  # one clip length: one bucket
    "world": "sparrow_jax.synthetic.world:world_source",  # the tiny video world's captions and QA (lazy)
    "video_instruct": "sparrow_jax.training.datasets:video_instruct_source",  # local LLaVA-Video-178K / ShareGPT4Video
}


def sample_source(name: str):
    """The sample-generating callable for a `data` config value."""
    spec = SOURCES.get(name, name)
    if ":" not in spec:
        raise ValueError(f"data {name!r}: not a known source {sorted(SOURCES)} nor a 'module:function' path")
    module, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data {name!r}: cannot load {spec} ({type(e).__name__}: {e})") from None


def _vision_ids(cfg) -> VisionTokenIds:
    return VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)


def colour_token_ids(target_cfg) -> tuple[list[int], list[int], int]:
    """(question ids, one answer id per colour in COLOURS order, end id) inside the text vocabulary;
    the end id is the config's first EOS when it has one."""
    n_text = min(target_cfg.text.vocab_size, target_cfg.image_token_id, target_cfg.video_token_id,
                 target_cfg.vision_start_token_id, target_cfg.vision_end_token_id)
    question, colours = [1, 2, 3, 4], list(range(5, 5 + len(COLOURS)))
    end = target_cfg.eos_token_ids[0] if target_cfg.eos_token_ids else colours[-1] + 1
    if max(colours[-1], end) >= target_cfg.text.vocab_size or colours[-1] >= n_text:
        raise ValueError(f"colour task needs {colours[-1] + 2} text token ids; the target has {n_text}")
    return question, colours, end


def colour_samples(target_cfg, n: int, *, seed: int = 0, side: int = 56, frames: int = 4,
                   long_frames: int = 8, long_every: int = 4) -> list[Sample]:
    """`q q q <video> q` -> `<colour> <end>`: one object of a random colour, shape, size and motion.
    The answer depends only on the video (chance = 1 / len(COLOURS)), so a model that beats chance
    reads the video through its vision tower. Every `long_every`-th clip has `long_frames` frames
    (two visual grids: two training buckets, as short clips plus a share of long videos give)."""
    rng = np.random.default_rng(seed)
    question, colour_ids, end = colour_token_ids(target_cfg)
    names = list(COLOURS)
    vcfg = VisionPreprocessConfig(min_pixels=side * side, max_pixels=side * side, fps=None)
    out = []
    for _ in range(n):
        # Large enough (about half the frame) to cover several patches wherever it moves.
        obj = MovingObject(colour=names[rng.integers(len(names))], shape=("square", "disc")[rng.integers(2)],
                           size=int(rng.integers(side * 2 // 5, side * 3 // 5)), start=tuple(rng.uniform(0.2, 0.8, 2)),
                           velocity=tuple(rng.uniform(-0.4, 0.4, 2)))
        t = long_frames if long_every and len(out) % long_every == long_every - 1 else frames
        visual = preprocess_frames(render_frames([obj], num_frames=t, fps=4, height=side, width=side), vcfg)
        prompt = build_multimodal_prompt([question[:3], visual, question[3:]], _vision_ids(target_cfg))
        out.append(Sample(prompt, (colour_ids[names.index(obj.colour)], end)))
    return out


def short_colour_samples(target_cfg, n: int, *, seed: int = 0) -> list[Sample]:
    """The colour task with short clips only (one visual grid, one compiled step: quickest runs)."""
    return colour_samples(target_cfg, n, seed=seed, long_every=0)
