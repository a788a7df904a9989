"""HF checkpoint directories <-> our NNX models (safetensors only, never pickle).

Reads `config.json` plus `model.safetensors` or a sharded set with `model.safetensors.index.json`.
Accepts both key layouts of Qwen2.5-VL: on disk (`model.layers.*`, `visual.*`) and transformers'
in-memory names (`model.language_model.*`, `model.visual.*`). Every missing, unexpected or wrongly
shaped key is an error naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sparrow_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model it claims to hold."""


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


def _tensor_files(d: Path) -> dict[str, Path]:
    """Map every tensor name to its file (single file or sharded index)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for f in sorted(set(wm.values())):
            if not (d / f).is_file():
                raise CheckpointError(f"{index}: shard {f} is missing")
        return {k: d / f for k, f in wm.items()}
    single = d / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), "np") as f:
                return {k: single for k in f.keys()}
        except Exception as e:  # truncated / corrupt header
            raise CheckpointError(f"{single}: cannot read safetensors ({type(e).__name__}: {e})") from None
    if list(d.glob("*.bin")) or list(d.glob("*.pt")):
        raise CheckpointError(f"{d}: only pickle weights (*.bin/*.pt) found; convert them to safetensors")
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_tensors(d: Path, normalize=normalize_key) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy (bf16 stays bf16 via ml_dtypes), keys normalized by
    `normalize` (the family's in-memory -> on-disk key map; Qwen2.5-VL's by default)."""
    files = _tensor_files(d)
    out, by_file = {}, {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        try:
            with safe_open(str(f), "flax") as fh:
                for k in keys:
                    out[normalize(k)] = np.asarray(fh.get_tensor(k))
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def load_qwen2_5_vl(path, *, dtype=jnp.float32) -> Qwen25VL:
    """Build a Qwen25VL from a HF directory. dtype: parameter/compute dtype (fp32 or bf16)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    cfg = Qwen25VLConfig.from_dir(d)
    tensors = read_tensors(d)
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
    return _fill(model, tensors, d, dtype, hf_name=_hf_name, to_ours=_to_ours,
                 to_hf=lambda n, w: _to_hf(n, w, cfg.vision))


def _fill(model, tensors: dict, d: Path, dtype, *, hf_name, to_ours, to_hf):
    """Fill an abstract model from checkpoint tensors; every missing, unexpected or misshaped key is a
    CheckpointError naming it (shared by every family's loader)."""
    wanted = {hf_name(p): (p, v) for p, v in nnx.to_flat_state(nnx.state(model))}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing:
        raise CheckpointError(f"{d}: missing weight key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{d}: unexpected weight key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    values = []
    for name, (p, v) in wanted.items():
        w = to_ours(name, tensors[name])
        if tuple(w.shape) != tuple(v.shape):
            raise CheckpointError(f"{d}: weight {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json implies {tuple(to_hf(name, np.zeros(v.shape)).shape)}")
        values.append((p, v.replace(jnp.asarray(w, dtype=dtype))))
    nnx.update(model, nnx.from_flat_state(values))
    return model


def save_qwen2_5_vl(model: Qwen25VL, path, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors in the on-disk HF layout (sharded with an index if
    `max_shard_bytes` is given), readable by transformers' `from_pretrained`."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf_cfg = cfg.to_hf_dict()
    tensors = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _hf_name(p)
        tensors[name] = np.ascontiguousarray(_to_hf(name, np.asarray(v[...]), cfg.vision))
    hf_cfg["dtype"] = str(next(iter(tensors.values())).dtype)
    (d / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if not max_shard_bytes:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        if cur and size + t.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += t.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ------------------------------------------------------------------------------- LLaVA-OneVision
# Canonical (on-disk, what transformers 5.23 `save_pretrained` writes): `language_model.model.*`,
# `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`, `image_newline`.
# Also accepted: transformers' in-memory names (`model.language_model.*`, `lm_head.weight`,
# `model.vision_tower.*`, ...) and the hub layout with `vision_tower.vision_model.*`.
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


def load_llava_onevision(path, *, dtype=jnp.float32):
    """Build a LlavaOneVision from a HF directory (any of the key layouts above). With tied
    embeddings `lm_head` may be absent (and is ignored if present); SigLIP's unused pooling head
    (`vision_tower.head.*`, vision_use_head) is ignored."""
    from sparrow_jax.models.llava_onevision import LlavaOneVision, LlavaOneVisionConfig  # noqa: PLC0415

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
    return _fill(model, tensors, d, dtype, hf_name=_llava_hf_name, to_ours=_llava_to_ours,
                 to_hf=lambda n, w: _llava_to_hf(n, w, cfg.vision))


def save_llava_onevision(model, path) -> None:
    """Write config.json + model.safetensors in the canonical on-disk layout (readable by
    transformers' `from_pretrained`)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _llava_hf_name(p)
        tensors[name] = np.ascontiguousarray(_llava_to_hf(name, np.asarray(v[...]), cfg.vision))
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = str(next(iter(tensors.values())).dtype)
    (d / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
