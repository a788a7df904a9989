"""LLaVA-OneVision's config: SigLIP's, the Qwen2 LM's (`qwen2_lm.TextConfig`) and the whole model's
(anyres pinpoints, feature layer, projector), read from and written to transformers' config.json."""

from __future__ import annotations

import dataclasses
import re

from sparrow_jax.models.config_io import ConfigError, read_config_json
from sparrow_jax.models.layers import activation
from sparrow_jax.models.qwen2_lm import TextConfig


# transformers' LlavaOnevisionConfig defaults (used when config.json omits them).
DEFAULT_GRID_PINPOINTS = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))
# transformers' LlavaOnevisionConfig default vision tower (SigLIP so400m, 384 px, patch 14).
_OV_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                           num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True  # the head is never used by LLaVA; its weights are ignored on load

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """G: patches per tile side (the conv is 'valid': 384 px / 14 -> 27, the last 6 px unused)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class LlavaOneVisionConfig:
    text: TextConfig
    vision: SiglipVisionConfig
    image_token_id: int
    video_token_id: int
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_GRID_PINPOINTS
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_layer: int | tuple[int, ...] = -1
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    family: str = "llava_onevision"

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"text config: hidden_size {t.hidden_size}, heads {t.num_attention_heads}, "
                              f"kv heads {t.num_key_value_heads} do not divide")
        if t.head_dim % 2:
            raise ConfigError(f"text config: head_dim {t.head_dim} must be even for RoPE")
        if v.hidden_size % v.num_attention_heads:
            raise ConfigError(f"vision config: hidden_size {v.hidden_size} not divisible by "
                              f"num_attention_heads {v.num_attention_heads}")
        if v.grid < 1:
            raise ConfigError(f"vision config: image_size {v.image_size} smaller than patch_size {v.patch_size}")
        if not re.fullmatch(r"anyres_max_\d+", self.vision_aspect_ratio):
            raise ConfigError(f"vision_aspect_ratio {self.vision_aspect_ratio!r}: expected 'anyres_max_<N>'")
        S = v.image_size
        for hw in self.image_grid_pinpoints:
            if len(hw) != 2 or hw[0] % S or hw[1] % S or min(hw) <= 0:
                raise ConfigError(f"image_grid_pinpoints entry {list(hw)} must be positive multiples of "
                                  f"image_size {S}")
        L = v.num_hidden_layers
        for i in self.feature_layers:
            if not -(L + 1) <= i <= L:
                raise ConfigError(f"vision_feature_layer {i} out of range for {L} SigLIP layers")
        activation(self.projector_hidden_act)
        activation(v.hidden_act)

    @property
    def num_layers(self) -> int:
        return self.text.num_hidden_layers

    @property
    def feature_layers(self) -> tuple[int, ...]:
        f = self.vision_feature_layer
        return (f,) if isinstance(f, int) else tuple(f)

    @property
    def max_num_patches(self) -> int:
        return int(self.vision_aspect_ratio[len("anyres_max_"):])

    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "config.json") -> "LlavaOneVisionConfig":
        mt = d.get("model_type")
        if mt not in ("llava_onevision", None):
            raise ConfigError(f"{source}: model_type {mt!r} is not llava_onevision")
        strategy = d.get("vision_feature_select_strategy", "full")
        if strategy != "full":
            # "default" drops the first (CLS) token, which SigLIP does not have: transformers' own
            # anyres packing and video pooling then fail on the G*G - 1 features.
            raise ConfigError(f"{source}: vision_feature_select_strategy {strategy!r} is not supported "
                              "(LLaVA-OneVision uses 'full')")
        try:
            t = d.get("text_config") or {}
            if t.get("model_type", "qwen2") != "qwen2":
                raise ConfigError(f"{source}: text_config.model_type {t.get('model_type')!r}: only qwen2 LMs "
                                  "are supported")
            if t.get("use_sliding_window") or "sliding_attention" in (t.get("layer_types") or ()):
                raise ConfigError(f"{source}: sliding-window attention in the Qwen2 LM is not supported")
            rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ConfigError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
            heads = t.get("num_attention_heads", 32)
            text = TextConfig(
                vocab_size=t.get("vocab_size", 151936), hidden_size=t.get("hidden_size", 4096),
                intermediate_size=t.get("intermediate_size", 22016),
                num_hidden_layers=t.get("num_hidden_layers", 32), num_attention_heads=heads,
                num_key_value_heads=t.get("num_key_value_heads") or heads,
                rms_norm_eps=t.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
                mrope_section=(), hidden_act=t.get("hidden_act", "silu"),
                max_position_embeddings=t.get("max_position_embeddings", 32768),
            )
            vd = d.get("vision_config")
            vd = dict(_OV_VISION_DEFAULTS) if vd is None else vd
            if vd.get("model_type", "siglip_vision_model") != "siglip_vision_model":
                raise ConfigError(f"{source}: vision_config.model_type {vd.get('model_type')!r}: only "
                                  "siglip_vision_model is supported")
            fields = {f.name for f in dataclasses.fields(SiglipVisionConfig)}
            vision = SiglipVisionConfig(**{k: vd[k] for k in fields if k in vd})
            if isinstance(vision.image_size, (list, tuple)) or isinstance(vision.patch_size, (list, tuple)):
                raise ConfigError(f"{source}: non-square SigLIP image_size/patch_size is not supported")
            eos = t.get("eos_token_id", d.get("eos_token_id"))
            eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
            fl = d.get("vision_feature_layer", -1)
            pins = d.get("image_grid_pinpoints")
            return cls(
                text=text, vision=vision,
                image_token_id=d.get("image_token_index", d.get("image_token_id", 151646)),
                video_token_id=d.get("video_token_index", d.get("video_token_id", 151647)),
                image_grid_pinpoints=DEFAULT_GRID_PINPOINTS if pins is None else tuple(tuple(p) for p in pins),
                vision_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9"),
                vision_feature_layer=fl if isinstance(fl, int) else tuple(fl),
                projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings") or t.get("tie_word_embeddings", False)),
                eos_token_ids=tuple(e for e in eos if 0 <= e < text.vocab_size),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: {type(e).__name__}: {e}") from None

    @classmethod
    def from_dir(cls, path) -> "LlavaOneVisionConfig":
        d, source = read_config_json(path, ConfigError)
        return cls.from_hf_dict(d, source=source)

    def to_hf_dict(self) -> dict:
        t, v = self.text, self.vision
        fl = self.vision_feature_layer
        return {
            "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
            "image_token_index": self.image_token_id, "video_token_index": self.video_token_id,
            "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
            "vision_aspect_ratio": self.vision_aspect_ratio,
            "vision_feature_layer": fl if isinstance(fl, int) else list(fl),
            "vision_feature_select_strategy": "full", "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings, "use_sliding_window": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "tie_word_embeddings": self.tie_word_embeddings,
                "eos_token_id": list(self.eos_token_ids) if self.eos_token_ids else None,
            },
            "vision_config": {
                "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads, "num_channels": v.num_channels,
                "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": v.hidden_act,
                "layer_norm_eps": v.layer_norm_eps, "vision_use_head": False,
            },
        }
