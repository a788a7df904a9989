"""What a target family provides: one typed contract (`TargetFamily`), so the registry, the target
speculation API (`target.py`), the engine, the trainers and the CLIs name no family.

A family is a package `sparrow_jax/models/<model_type>/` with
  config.py    the frozen config: `from_hf_dict(d, source=)`, `to_hf_dict()`, `family` == model_type,
               `num_layers`, `text` (a `qwen2_lm.TextConfig`-like LM config), `eos_token_ids`;
  modules.py   the NNX module `(cfg, *, rngs, dtype)`, with the `TargetModel` hooks below;
  batching.py  host-side layouts and `prepare_prefill_batch(prompts, cfg, *, seq_bucket, dtype)`;
  checkpoint.py  HF loader and saver;
  inputs.py    the input side: visual readers, chat prompt, tokenizer markers;
and its `__init__.py` builds `FAMILY = TargetFamily(...)`, which `registry.FAMILIES` lists (one line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol


class TargetModel(Protocol):
    """The hooks `target.py` calls on a family's module (pure functions of its parameters)."""

    cfg: Any

    def embed(self, ids_BT): ...  # token embeddings [B, T, D]

    def rope(self, positions_3BT): ...  # (cos, sin) of 3 position streams (1-D RoPE reads stream 0)

    def decoder(self, x_BTD, cos, sin, mask, *, caches=None, impl=None, capture=(), key_visible_LBS=None):
        """(final-norm hidden, per-layer new (k, v), {i: hidden state i for i in capture})."""

    def layer_queries(self, layer: int, x_BTD, cos, sin): ...  # roped queries [B, T, H, E] of a decoder layer

    def logits(self, h_BTD): ...  # LM head

    def encode_visuals(self, pixels, layout, impl=None): ...  # the batch's visual tokens [M, D], one call

    def visual_chunks(self, pixels, layout, chunk_patches: int):
        """Host: yields (pixels, chunk layout, valid output rows) per bounded tower call."""

    def encode_chunk(self, pixels, layout, impl=None): ...  # one chunk's tower output

    def combine_chunks(self, feats, layout): ...  # the chunks' outputs, concatenated -> visual tokens [M, D]

    def chunk_dims(self, pixels, layout) -> tuple[int, ...]:
        """Host: a chunk's sizes that `pad_chunk` can grow (ints; () when every chunk has one shape)."""

    def pad_chunk(self, pixels, layout, dims):
        """Host: (pixels, layout) of the chunk grown to `dims` (elementwise >= its `chunk_dims`): chunks of
        different sizes stack into one shape, and `encode_chunk`'s first `valid` rows stay the chunk's own."""


class VisualReaders(NamedTuple):
    """A target's preprocessing: video path -> visual, image (path, PIL image or uint8 array) -> visual."""

    video: Callable[[Any], Any]
    image: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class TargetFamily:
    """One target family: everything the family-agnostic code reads of it."""

    model_type: str  # config.json's model_type, the registry key
    name: str  # for messages ("Qwen2.5-VL")
    config_cls: type  # .from_hf_dict(d, source=) -> frozen config; .to_hf_dict()
    module_cls: type  # (cfg, *, rngs, dtype) -> a TargetModel
    load: Callable[..., Any]  # (path, *, dtype) -> TargetModel from a HF checkpoint directory
    save: Callable[..., None]  # (model, path) -> config.json + safetensors transformers reads
    prepare_prefill_batch: Callable[..., Any]  # (prompts, cfg, *, seq_bucket=None, dtype) -> target.PrefillBatch
    rope_delta: Callable[[Any, Any], int]  # (prompt, cfg) -> decode position of cache slot i is i + delta
    # the input side (sparrow_jax.io): video/image preprocessing, chat prompt, tokenizer checks
    video_options: tuple[str, ...]  # the VisionOptions fields that steer this family's frame sampling
    frames_note: str  # how it samples frames; str.format fields: the option names, spelled by the caller
    visual_readers: Callable[..., VisualReaders]  # (cfg, model_dir | None, *, budget, options) -> readers
    chat_prompt: Callable[..., Any]  # (cfg, codec, visual | None, question) -> one user turn + assistant prefix
    tokenizer_marks: tuple[tuple[str, str | None], ...]  # chat markers that must be one token (and the
    # config field holding the id it must have, or None), besides <|im_start|> / <|im_end|>
    blank_video: Callable[..., tuple]  # (cfg, frames, frame_side) -> (visual of zero pixels, its token ids)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                raise TypeError(f"target family {self.model_type!r}: {f.name} is missing")
