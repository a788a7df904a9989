"""HF checkpoint directories <-> our NNX models, for every family: the names callers use. The shared
safetensors code is `sparrow_jax.io.hf_weights`; each family's key map, loader and saver live in its
package (`sparrow_jax.models.<family>.checkpoint`); `registry.load_target` / `save_target` pick one by
`model_type`."""

from __future__ import annotations

from sparrow_jax.io.hf_weights import CheckpointError, read_tensors
from sparrow_jax.models.llava_onevision.checkpoint import load_llava_onevision, normalize_llava_key, \
    save_llava_onevision
from sparrow_jax.models.qwen2_5_vl.checkpoint import load_qwen2_5_vl, normalize_key, save_qwen2_5_vl

__all__ = ["CheckpointError", "load_llava_onevision", "load_qwen2_5_vl", "normalize_key", "normalize_llava_key",
           "read_tensors", "save_llava_onevision", "save_qwen2_5_vl"]
