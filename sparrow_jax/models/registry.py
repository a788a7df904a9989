"""Target families by `model_type`: one table (`FAMILIES`) of `family.TargetFamily` contracts, and the
lookups the engine, AR generation, the trainers and the CLIs call (config parsing, checkpoint loading and
saving, random construction, the host-side batch builder), so they work for every family without
naming one. A new family is a package under `sparrow_jax/models/` and one line in `FAMILIES`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparrow_jax.models import llava_onevision, qwen2_5_vl
from sparrow_jax.models.config_io import ConfigError, read_config_json
from sparrow_jax.models.family import TargetFamily
from sparrow_jax.models.layers import ACTIVATIONS

FAMILIES: dict[str, TargetFamily] = {f.model_type: f for f in (
    qwen2_5_vl.FAMILY,
    llava_onevision.FAMILY,
)}


def family(model_type, source: str) -> TargetFamily:
    """The family of a config.json's `model_type`; an unknown one is a ConfigError naming `source`."""
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not a supported target family {list(FAMILIES)}")
    return FAMILIES[model_type]


def family_of(cfg) -> TargetFamily:
    """The family of a parsed target config (its `family` field)."""
    return family(getattr(cfg, "family", None), type(cfg).__name__)


# config.json keys naming an activation function, per family (checked against layers.ACTIVATIONS).
ACTIVATION_KEYS = (("hidden_act",), ("text_config", "hidden_act"), ("vision_config", "hidden_act"),
                   ("projector_hidden_act",))


# Integer and real-valued fields of both families' config.json (top level, text_config, vision_config).
INT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "depth", "num_heads", "out_hidden_size", "in_channels",
    "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "image_size", "num_channels",
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index",
    "video_token_index"})
REAL_KEYS = frozenset({"rms_norm_eps", "layer_norm_eps", "rope_theta", "tokens_per_second"})


def _check_keys(d: dict, source: str) -> None:
    """Values the families' builders would refuse late (while building a model), named by file and key."""
    for prefix, node in (("", d), ("text_config.", d.get("text_config")), ("vision_config.", d.get("vision_config"))):
        for k, v in (node.items() if isinstance(node, dict) else ()):
            bad_int = k in INT_KEYS and v is not None and (isinstance(v, bool) or not isinstance(v, int))
            bad_real = k in REAL_KEYS and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
            if bad_int or bad_real:
                raise ConfigError(f"{source}: {prefix}{k} {v!r} must be {'an integer' if bad_int else 'a number'}")

    for path in ACTIVATION_KEYS:
        node = d
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None and node not in ACTIVATIONS:
            raise ConfigError(f"{source}: {'.'.join(path)} {node!r} is not a supported activation; "
                              f"supported (transformers' names): {sorted(ACTIVATIONS)}")


def config_from_dict(d: dict, source: str = "config.json"):
    """A HF config.json dict -> the family's frozen config (dispatch on `model_type`). Every error names
    `source` (the file) and, where one is at fault, the key."""
    cls = family(d.get("model_type"), source).config_cls
    _check_keys(d, source)
    try:
        return cls.from_hf_dict(d, source=source)
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type or range deep inside
        raise ConfigError(f"{source}: invalid value ({type(e).__name__}: {' '.join(str(e).split())})") from None


def read_config_dict(path) -> tuple[dict, str]:
    """config.json of a checkpoint directory (or a config file path) -> (dict, source name)."""
    return read_config_json(path, ConfigError, "a HF checkpoint directory or a config.json")


def load_target(path, dtype=jnp.float32):
    """Load a HF checkpoint directory with the loader of its config's `model_type`."""
    d, source = read_config_dict(path)
    config_from_dict(d, source)  # its errors name the file and key, before any weights are read
    return family(d.get("model_type"), source).load(path, dtype=dtype)


def save_target(model, path) -> None:
    """Write a target as a HF checkpoint directory (config.json + safetensors) with its family's saver."""
    family_of(model.cfg).save(model, path)


def build_target(cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
    """A randomly initialised target of `cfg`'s family."""
    return family_of(cfg).module_cls(cfg, rngs=rngs, dtype=dtype)


def prepare_batch_for(cfg):
    """The family's host batch builder `(prompts, cfg, **kw) -> target.PrefillBatch`."""
    return family_of(cfg).prepare_prefill_batch


# ------------------------------------------------------------------------- the input side's options

VIDEO_OPTIONS = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.video_options))


def foreign_video_options(cfg) -> tuple[str, ...]:
    """The video options other families read and `cfg`'s family does not."""
    return tuple(k for k in VIDEO_OPTIONS if k not in family_of(cfg).video_options)


def video_option_owners(key: str) -> str:
    """The families a video option applies to, for messages ("Qwen2.5-VL")."""
    return " / ".join(f.name for f in FAMILIES.values() if key in f.video_options)


def frames_note(cfg, name=str) -> str:
    """How `cfg`'s family samples frames, its options spelled by `name` ("a LLaVA-OneVision target samples
    num_frames frames per video at its own tile size")."""
    fam = family_of(cfg)
    return f"a {fam.name} target " + fam.frames_note.format_map({k: name(k) for k in VIDEO_OPTIONS})
