"""LLaVA-OneVision HF checkpoint directories <-> `LlavaOneVision`: the key map, the loader and the
saver, over the shared safetensors code of `sparrow_jax.io.hf_weights`.

Canonical (on-disk, what transformers 5.23 `save_pretrained` writes): `language_model.model.*`,
`language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`, `image_newline`.
Also accepted: transformers' in-memory names (`model.language_model.*`, `lm_head.weight`,
`model.vision_tower.*`, ...) and the hub layout with `vision_tower.vision_model.*`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.io.hf_weights import CheckpointError, fill_model, read_tensors, save_tensors
from sparrow_jax.models.llava_onevision.config import LlavaOneVisionConfig
from sparrow_jax.models.llava_onevision.modules import LlavaOneVision

_LLAVA_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("model.image_newline", "image_newline"))


def normalize_llava_key(key: str) -> str:
    for a, b in _LLAVA_PREFIXES:
        if key.startswith(a):
            key = b + key[len(a):]
            break
    if key.startswith("vision_tower.vision_model."):
        key = "vision_tower." + key[len("vision_tower.vision_model."):]
    return key


def _llava_hf_name(path) -> str:
    name = ".".join(str(p) for p in path)
    if name.startswith("model."):
        name = "language_model." + name
    elif name.startswith("lm_head."):
        name = "language_model." + name
    stem, _, leaf = name.rpartition(".")
    return f"{stem}.weight" if leaf in ("kernel", "embedding") else name


def _llava_to_ours(hf_name: str, w: np.ndarray) -> np.ndarray:
    if hf_name.endswith("patch_embedding.weight") and w.ndim == 4:  # Conv2d [D, C, p, p], stride = kernel
        return w.reshape(w.shape[0], -1).T
    if w.ndim == 2 and not hf_name.endswith(("embed_tokens.weight", "position_embedding.weight")):
        return w.T  # torch Linear [out, in]
    return w


def _llava_to_hf(hf_name: str, w: np.ndarray, vcfg) -> np.ndarray:
    if hf_name.endswith("patch_embedding.weight"):
        return w.T.reshape(w.shape[1], vcfg.num_channels, vcfg.patch_size, vcfg.patch_size)
    if w.ndim == 2 and not hf_name.endswith(("embed_tokens.weight", "position_embedding.weight")):
        return w.T
    return w


def load_llava_onevision(path, *, dtype=jnp.float32) -> LlavaOneVision:
    """Build a LlavaOneVision from a HF directory (any of the key layouts above). With tied
    embeddings `lm_head` may be absent (and is ignored if present); SigLIP's unused pooling head
    (`vision_tower.head.*`, vision_use_head) is ignored."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    cfg = LlavaOneVisionConfig.from_dir(d)
    tensors = read_tensors(d, normalize_llava_key)
    model = nnx.eval_shape(lambda: LlavaOneVision(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    if cfg.tie_word_embeddings:
        tensors.pop("language_model.lm_head.weight", None)
    for k in [k for k in tensors if k.startswith("vision_tower.head.")]:
        tensors.pop(k)
    return fill_model(model, tensors, d, dtype, hf_name=_llava_hf_name, to_ours=_llava_to_ours,
                      to_hf=lambda n, w: _llava_to_hf(n, w, cfg.vision))


def save_llava_onevision(model: LlavaOneVision, path) -> None:
    """Write config.json + model.safetensors in the canonical on-disk layout (readable by
    transformers' `from_pretrained`)."""
    cfg = model.cfg
    tensors = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _llava_hf_name(p)
        tensors[name] = np.ascontiguousarray(_llava_to_hf(name, np.asarray(v[...]), cfg.vision))
    save_tensors(tensors, cfg.to_hf_dict(), Path(path))
