"""Synthetic training samples until the tiny video world's captions/QA ship: a procedural video (real
frames through the real preprocessing), random prompt text around it and a response. Draft training
needs no meaningful responses: the targets are the target model's own hidden states and next-token
distributions along the sequence (or set `regenerate` in extraction to use the target's answers)."""

from __future__ import annotations

import numpy as np

from sparrow_jax.io.vision_inputs import VisionPreprocessConfig, VisionTokenIds, build_multimodal_prompt, \
    preprocess_frames
from sparrow_jax.synthetic.video import random_scene, render_frames
from sparrow_jax.training.data import Sample


def synthetic_samples(target_cfg, n: int, *, seed: int = 0, text_vocab: int | None = None, side: int = 56,
                      frames: int = 4, prompt_len=(3, 8), response_len=(6, 12)) -> list[Sample]:
    rng = np.random.default_rng(seed)
    vocab = text_vocab or min(target_cfg.text.vocab_size, target_cfg.image_token_id, target_cfg.vision_start_token_id)
    ids = VisionTokenIds(target_cfg.vision_start_token_id, target_cfg.vision_end_token_id, target_cfg.image_token_id,
                         target_cfg.video_token_id)
    vcfg = VisionPreprocessConfig(min_pixels=side * side, max_pixels=side * side, fps=None)
    out = []
    for _ in range(n):
        video = render_frames(random_scene(rng), num_frames=frames, fps=4, height=side, width=side)
        visual = preprocess_frames(video, vcfg)
        text = lambda lo_hi: rng.integers(1, vocab, int(rng.integers(*lo_hi))).tolist()  # noqa: E731
        prompt = build_multimodal_prompt([text(prompt_len), visual, text((1, 4))], ids)
        out.append(Sample(prompt, tuple(text(response_len))))
    return out
