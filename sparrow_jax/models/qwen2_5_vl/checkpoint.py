"""Qwen2.5-VL HF checkpoint directories <-> `Qwen25VL`: the key map (both layouts transformers uses:
on disk `model.layers.*`, `visual.*`, and its in-memory `model.language_model.*`, `model.visual.*`),
the loader and the saver, over the shared safetensors code of `sparrow_jax.io.hf_weights`."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.io.hf_weights import CheckpointError, fill_model, read_tensors, save_tensors
from sparrow_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from sparrow_jax.models.qwen2_5_vl.modules import Qwen25VL


# HF name fragments that differ from our attribute names (ours -> HF).
_RENAMES = (("merger.fc1.", "merger.mlp.0."), ("merger.fc2.", "merger.mlp.2."),
            ("patch_embed.kernel", "patch_embed.proj.kernel"))
# transformers' in-memory prefixes -> on-disk prefixes.
_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def normalize_key(key: str) -> str:
    for a, b in _PREFIXES:
        if key.startswith(a):
            return b + key[len(a):]
    return key


def _hf_name(path) -> str:
    name = ".".join(str(p) for p in path)
    for ours, hf in _RENAMES:
        name = name.replace(ours, hf)
    return name.replace(".kernel", ".weight").replace(".embedding", ".weight")


def _to_ours(hf_name: str, w: np.ndarray) -> np.ndarray:
    if hf_name.endswith("patch_embed.proj.weight"):  # Conv3d [E, C, tp, p, p], stride = kernel: a Linear
        return w.reshape(w.shape[0], -1).T
    if w.ndim == 2 and not hf_name.endswith("embed_tokens.weight"):  # torch Linear [out, in]
        return w.T
    return w


def _to_hf(hf_name: str, w: np.ndarray, vcfg) -> np.ndarray:
    if hf_name.endswith("patch_embed.proj.weight"):
        return w.T.reshape(w.shape[1], vcfg.in_channels, vcfg.temporal_patch_size, vcfg.patch_size, vcfg.patch_size)
    if w.ndim == 2 and not hf_name.endswith("embed_tokens.weight"):
        return w.T
    return w


def load_qwen2_5_vl(path, *, dtype=jnp.float32) -> Qwen25VL:
    """Build a Qwen25VL from a HF directory. dtype: parameter/compute dtype (fp32 or bf16)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    cfg = Qwen25VLConfig.from_dir(d)
    tensors = read_tensors(d, normalize_key)
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
    return fill_model(model, tensors, d, dtype, hf_name=_hf_name, to_ours=_to_ours,
                      to_hf=lambda n, w: _to_hf(n, w, cfg.vision))


def save_qwen2_5_vl(model: Qwen25VL, path, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors in the on-disk HF layout (sharded with an index if
    `max_shard_bytes` is given), readable by transformers' `from_pretrained`."""
    cfg = model.cfg
    tensors = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _hf_name(p)
        tensors[name] = np.ascontiguousarray(_to_hf(name, np.asarray(v[...]), cfg.vision))
    save_tensors(tensors, cfg.to_hf_dict(), Path(path), max_shard_bytes=max_shard_bytes)
