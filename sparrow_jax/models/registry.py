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


def config_from_dict(d: dict, source: str = "config.json"):
    """A HF config.json dict -> the family's frozen config (dispatch on `model_type`)."""
    if _family(d.get("model_type"), source) == "llava_onevision":
        from sparrow_jax.models.llava_onevision import LlavaOneVisionConfig  # noqa: PLC0415

        return LlavaOneVisionConfig.from_hf_dict(d, source=source)
    from sparrow_jax.models.qwen2_5_vl import Qwen25VLConfig  # noqa: PLC0415

    return Qwen25VLConfig.from_hf_dict(d, source=source)


def read_config_dict(path) -> tuple[dict, str]:
    """config.json of a checkpoint directory (or a config file path) -> (dict, source name)."""
    from sparrow_jax.models.config_io import read_config_json  # noqa: PLC0415

    return read_config_json(path, ConfigError, "a HF checkpoint directory or a config.json")


def load_target(path, dtype=jnp.float32):
    """Load a HF checkpoint directory with the loader of its config's `model_type`."""
    d, source = read_config_dict(path)
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
