"""Target families by `model_type`: config parsing, checkpoint loading, random construction and the
host-side batch builder. The engine, AR generation and the CLIs go through here, so they work for
every family without naming one."""

from __future__ import annotations


import jax.numpy as jnp
from flax import nnx

from sparrow_jax.models.qwen2_5_vl import ConfigError

FAMILIES = ("qwen2_5_vl", "llava_onevision")


def _family(model_type, source: str) -> str:
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not a supported target family {list(FAMILIES)}")
    return model_type


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
    from sparrow_jax.models.layers import ACTIVATIONS  # noqa: PLC0415

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
    family = _family(d.get("model_type"), source)
    _check_keys(d, source)
    if family == "llava_onevision":
        from sparrow_jax.models.llava_onevision import LlavaOneVisionConfig as cls  # noqa: PLC0415
    else:
        from sparrow_jax.models.qwen2_5_vl import Qwen25VLConfig as cls  # noqa: PLC0415
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
    from sparrow_jax.models.config_io import read_config_json  # noqa: PLC0415

    return read_config_json(path, ConfigError, "a HF checkpoint directory or a config.json")


def load_target(path, dtype=jnp.float32):
    """Load a HF checkpoint directory with the loader of its config's `model_type`."""
    d, source = read_config_dict(path)
    config_from_dict(d, source)  # its errors name the file and key, before any weights are read
    if _family(d.get("model_type"), source) == "llava_onevision":
        from sparrow_jax.io.hf_checkpoint import load_llava_onevision  # noqa: PLC0415

        return load_llava_onevision(path, dtype=dtype)
    from sparrow_jax.io.hf_checkpoint import load_qwen2_5_vl  # noqa: PLC0415

    return load_qwen2_5_vl(path, dtype=dtype)


def build_target(cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
    """A randomly initialised target of `cfg`'s family."""
    if cfg.family == "llava_onevision":
        from sparrow_jax.models.llava_onevision import LlavaOneVision  # noqa: PLC0415

        return LlavaOneVision(cfg, rngs=rngs, dtype=dtype)
    from sparrow_jax.models.qwen2_5_vl import Qwen25VL  # noqa: PLC0415

    return Qwen25VL(cfg, rngs=rngs, dtype=dtype)


def prepare_batch_for(cfg):
    """The family's host batch builder `(prompts, cfg, **kw) -> target.PrefillBatch`."""
    family = _family(getattr(cfg, "family", None), type(cfg).__name__)
    if family == "llava_onevision":
        from sparrow_jax.models.llava_onevision import prepare_prefill_batch  # noqa: PLC0415
    else:
        from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch  # noqa: PLC0415
    return prepare_prefill_batch
