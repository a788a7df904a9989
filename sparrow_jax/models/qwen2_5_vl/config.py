"""Qwen2.5-VL's config: the vision tower's, the LM's (`qwen2_lm.TextConfig`) and the whole model's,
read from and written to transformers' config.json."""

from __future__ import annotations

import dataclasses

from sparrow_jax.models.config_io import ConfigError, read_config_json
from sparrow_jax.models.qwen2_lm import TextConfig

__all__ = ["ConfigError", "Qwen25VLConfig", "TextConfig", "VisionConfig"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: float = 4
    window_size: int = 112
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    family: str = "qwen2_5_vl"

    def __post_init__(self):
        t = self.text
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"text config: hidden_size {t.hidden_size}, heads {t.num_attention_heads}, "
                              f"kv heads {t.num_key_value_heads} do not divide")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ConfigError(f"text config: mrope_section {list(t.mrope_section)} sums to {sum(t.mrope_section)}, "
                              f"must be head_dim/2 = {t.head_dim // 2}")
        v = self.vision
        if v.hidden_size % v.num_heads or (v.head_dim // 2) % 2:
            raise ConfigError(f"vision config: hidden_size {v.hidden_size} / num_heads {v.num_heads} must give an "
                              "even head_dim divisible by 4")

    @property
    def num_layers(self) -> int:
        return self.text.num_hidden_layers

    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "config.json") -> "Qwen25VLConfig":
        mt = d.get("model_type")
        if mt not in ("qwen2_5_vl", None):
            raise ConfigError(f"{source}: model_type {mt!r} is not qwen2_5_vl")
        try:
            t = d.get("text_config") or d  # older configs keep text fields at the top level
            rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
            v = d["vision_config"]
            text = TextConfig(
                vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
                rms_norm_eps=t.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1e6))),
                mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                hidden_act=t.get("hidden_act", "silu"),
                max_position_embeddings=t.get("max_position_embeddings", 128000),
            )
            vrope = v.get("rope_parameters") or {}
            vision = VisionConfig(
                depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"],
                fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
                in_channels=v.get("in_channels", 3), patch_size=v.get("patch_size", 14),
                spatial_merge_size=v.get("spatial_merge_size", 2),
                temporal_patch_size=v.get("temporal_patch_size", 2),
                tokens_per_second=v.get("tokens_per_second", 4), window_size=v.get("window_size", 112),
                hidden_act=v.get("hidden_act", "silu"), rope_theta=float(vrope.get("rope_theta", 10000.0)),
            )
            eos = t.get("eos_token_id", d.get("eos_token_id"))
            eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
            return cls(text=text, vision=vision, image_token_id=d["image_token_id"],
                       video_token_id=d["video_token_id"], vision_start_token_id=d["vision_start_token_id"],
                       vision_end_token_id=d["vision_end_token_id"],
                       tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
                       eos_token_ids=tuple(e for e in eos if 0 <= e < text.vocab_size))
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None

    @classmethod
    def from_dir(cls, path) -> "Qwen25VLConfig":
        d, source = read_config_json(path, ConfigError)
        return cls.from_hf_dict(d, source=source)

    def to_hf_dict(self) -> dict:
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section)},
                "eos_token_id": list(self.eos_token_ids) if self.eos_token_ids else None,
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
                "out_hidden_size": v.out_hidden_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "in_channels": v.in_channels, "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                "tokens_per_second": v.tokens_per_second, "window_size": v.window_size, "hidden_act": v.hidden_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }
