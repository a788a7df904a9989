"""LLaVA-OneVision in Flax NNX: SigLIP vision tower, multimodal projector, anyres image packing and
pooled video features, Qwen2 language model with plain 1-D RoPE — and the host-side layout math.

What transformers 5.23 (`modeling_llava_onevision.py`) does, and we reproduce:
- every visual is a stack of square tiles [n, C, S, S] run through SigLIP; features are SigLIP
  hidden states `vision_feature_layer` (-1 = output of the last encoder layer, *before*
  `post_layernorm`), projected by linear_1 -> act -> linear_2 to the LM width;
- video: per frame the G x G feature grid (G = S / patch) is resized bilinearly to ceil(G/2)^2
  (`apply_pooling`; a plain 2x2 average when G is even), frames are concatenated, then one
  `image_newline` token per video;
- image, single-image prompt ("anyres"): tile 0 is the whole image at S x S (base, G^2 tokens);
  tiles 1.. cover the best-fitting `image_grid_pinpoints` resolution row-major. Their features form
  a (nph*G) x (npw*G) grid that is cropped to the image's aspect ratio (`unpad_image`), resized
  bilinearly when larger than `anyres_max_N` tiles by a factor > 1.1, and followed by one newline
  per row; tokens = base, then the grid row-major with the newline at each row end;
- image in a multi-image prompt: base tile only, G^2 tokens + one newline.

All of these are linear maps of the projected features, fixed by host-known sizes. The host builds
them once per batch as a 4-tap gather (`LlavaVisionLayout`): output token m = sum_k w[m, k] *
table[idx[m, k]], the table being `image_newline` followed by the projected tile features.

Module attribute names mirror the HF checkpoint keys (see `sparrow_jax.io.hf_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.layers import activation, axes_metadata, embed, linear, rope_cos_sin_1d
from sparrow_jax.models.qwen2_5_vl import ConfigError, TextConfig, TextModel

# ----------------------------------------------------------------------------------------- configs

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
        from sparrow_jax.models.config_io import read_config_json  # noqa: PLC0415

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


# ------------------------------------------------------------------------------ host-side layouts


def select_best_resolution(image_hw, pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) keeping the most image pixels, then wasting the fewest (HF's rule)."""
    oh, ow = image_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


@dataclasses.dataclass(frozen=True)
class AnyresGeometry:
    """Where an anyres image's tile features land: tiles grid (nph, npw); the feature grid
    (nph*G, npw*G) cropped to rows [r0, r1) and cols [c0, c1); resized to (out_h, out_w)."""

    nph: int
    npw: int
    r0: int
    r1: int
    c0: int
    c1: int
    out_h: int
    out_w: int

    @property
    def num_tiles(self) -> int:
        return 1 + self.nph * self.npw


def anyres_geometry(image_hw, cfg: LlavaOneVisionConfig) -> AnyresGeometry:
    """transformers' get_anyres_image_grid_shape + unpad_image + the anyres_max resize rule."""
    oh, ow = (int(x) for x in image_hw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"image size {image_hw} must be positive")
    G, S = cfg.vision.grid, cfg.vision.image_size
    bh, bw = select_best_resolution((oh, ow), cfg.image_grid_pinpoints)
    nph, npw = bh // S, bw // S
    ch, cw = nph * G, npw * G
    r0, r1, c0, c1 = 0, ch, 0, cw
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        r0, r1 = pad, ch - pad
    else:
        new_w = int(round(ow * (ch / oh), 7))
        pad = (cw - new_w) // 2
        c0, c1 = pad, cw - pad
    h, w = r1 - r0, c1 - c0
    ratio = math.sqrt(h * w / (cfg.max_num_patches * G**2))
    out_h, out_w = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
    return AnyresGeometry(nph, npw, r0, r1, c0, c1, out_h, out_w)


def num_tiles(kind: str, cfg: LlavaOneVisionConfig, *, image_hw=None, num_frames: int = 0, anyres: bool = True) -> int:
    """Tiles [n, C, S, S] a visual feeds to SigLIP (video: its frames)."""
    if kind == "video":
        return num_frames
    return anyres_geometry(image_hw, cfg).num_tiles if anyres else 1


def num_visual_tokens(kind: str, cfg: LlavaOneVisionConfig, *, image_hw=None, num_frames: int = 0,
                      anyres: bool = True) -> int:
    """LM placeholder tokens of one visual, as transformers' processor counts them."""
    G = cfg.vision.grid
    if kind == "video":
        return num_frames * (-(-G // 2)) ** 2 + 1
    if not anyres:
        return G * G + 1
    g = anyres_geometry(image_hw, cfg)
    return G * G + g.out_h * (g.out_w + 1)


def _bilinear_taps(n_in: int, n_out: int):
    """torch's bilinear interpolation (align_corners=False, no antialias) along one axis, in fp32:
    source indices (i0, i1) and weights (l0, l1) per output index."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def _resize_taps(rows, cols, out_h: int, out_w: int):
    """4-tap (index, weight) tables [out_h*out_w, 4] resizing a grid whose cell (r, c) holds table
    row rows[r] + cols[c] (rows/cols: 1-D index arrays) to out_h x out_w, row-major."""
    hi0, hi1, hl0, hl1 = _bilinear_taps(len(rows), out_h)
    wi0, wi1, wl0, wl1 = _bilinear_taps(len(cols), out_w)
    R = lambda i: rows[i][:, None]  # noqa: E731
    C = lambda i: cols[i][None, :]  # noqa: E731
    idx = np.stack([R(hi0) + C(wi0), R(hi0) + C(wi1), R(hi1) + C(wi0), R(hi1) + C(wi1)], -1)
    w = np.stack([hl0[:, None] * wl0[None], hl0[:, None] * wl1[None], hl1[:, None] * wl0[None],
                  hl1[:, None] * wl1[None]], -1)
    return idx.reshape(-1, 4), w.reshape(-1, 4).astype(np.float32)


def _identity_taps(ids):
    ids = np.asarray(ids, np.int64)
    idx = np.zeros((len(ids), 4), np.int64)
    idx[:, 0] = ids
    w = np.zeros((len(ids), 4), np.float32)
    w[:, 0] = 1
    return idx, w


def visual_taps(kind: str, cfg: LlavaOneVisionConfig, base: int, newline: int, *, image_hw=None,
                num_frames: int = 0, anyres: bool = True):
    """(idx [m, 4], w [m, 4]) producing one visual's m LM tokens from the feature table, whose rows
    base, base + 1, ... hold this visual's tile features (tile-major, then patch row-major) and row
    `newline` holds image_newline."""
    G = cfg.vision.grid
    nl = _identity_taps([newline])
    if kind == "video":
        P = -(-G // 2)
        parts = [_resize_taps(base + f * G * G + np.arange(G) * G, np.arange(G), P, P) for f in range(num_frames)]
        parts.append(nl)
    elif not anyres:
        parts = [_identity_taps(base + np.arange(G * G)), nl]
    else:
        g = anyres_geometry(image_hw, cfg)
        r, c = np.arange(g.r0, g.r1), np.arange(g.c0, g.c1)
        # grid cell (r, c) -> tile 1 + (r // G) * npw + c // G, patch (r % G, c % G)
        rows = base + (1 + (r // G) * g.npw) * G * G + (r % G) * G
        cols = (c // G) * G * G + c % G
        idx, w = _resize_taps(rows, cols, g.out_h, g.out_w)
        idx = np.concatenate([idx.reshape(g.out_h, g.out_w, 4),
                              np.broadcast_to(nl[0].reshape(1, 1, 4), (g.out_h, 1, 4))], 1).reshape(-1, 4)
        w = np.concatenate([w.reshape(g.out_h, g.out_w, 4),
                            np.broadcast_to(nl[1].reshape(1, 1, 4), (g.out_h, 1, 4))], 1).reshape(-1, 4)
        parts = [_identity_taps(base + np.arange(G * G)), (idx, w)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LlavaVisionLayout:
    """How the batch's visual tokens are made from the tile features: token m = sum_k src_w[m, k] *
    table[src_idx[m, k]], table = [image_newline ; projected features of all tiles (tile-major,
    patch row-major)] (the newline first, so padding tiles at the end change no index)."""

    src_idx: jax.Array  # [M, 4] int32
    src_w: jax.Array  # [M, 4] float32


def _visual_info(v, cfg: LlavaOneVisionConfig):
    """(kind, keyword args for the geometry helpers) of a duck-typed visual: `kind`, `pixel_values`
    [n, C, S, S]; images also `image_size` (h, w) and optionally `anyres` (default True)."""
    pix = np.asarray(v.pixel_values)
    v_cfg = cfg.vision
    want = (v_cfg.num_channels, v_cfg.image_size, v_cfg.image_size)
    if pix.ndim != 4 or tuple(pix.shape[1:]) != want:
        raise ValueError(f"{v.kind} pixel_values shape {pix.shape}: expected [n, {want[0]}, {want[1]}, {want[2]}]")
    if v.kind == "video":
        return "video", dict(num_frames=pix.shape[0])
    if v.kind != "image":
        raise ValueError(f"visual kind {v.kind!r}: expected 'image' or 'video'")
    anyres = bool(getattr(v, "anyres", True))
    kw = dict(image_hw=tuple(int(x) for x in v.image_size), anyres=anyres)
    n = num_tiles("image", cfg, **kw)
    if pix.shape[0] != n:
        raise ValueError(f"image of size {kw['image_hw']} ({'anyres' if anyres else 'base only'}) needs {n} tiles, "
                         f"pixel_values has {pix.shape[0]}")
    return "image", kw


def vision_layout(visuals, cfg: LlavaOneVisionConfig) -> tuple[LlavaVisionLayout, list[int]]:
    """The 4-tap layout for visuals in batch order, and each visual's token count."""
    idx, w, counts, tile0 = [], [], [], 0
    for v in visuals:
        kind, kw = _visual_info(v, cfg)
        i, ww = visual_taps(kind, cfg, 1 + tile0 * cfg.vision.grid**2, 0, **kw)
        idx.append(i)
        w.append(ww)
        counts.append(len(i))
        tile0 += np.asarray(v.pixel_values).shape[0]
    return LlavaVisionLayout(jnp.asarray(np.concatenate(idx), jnp.int32), jnp.asarray(np.concatenate(w))), counts


# ------------------------------------------------------------------------------------------ modules


class LayerNorm(nnx.Module):
    """torch LayerNorm (two-pass variance) in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), **axes_metadata("norm"))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), **axes_metadata("norm"))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs, dtype):
        D = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = linear(D, D, ("embed", "heads"), bias=True, rngs=rngs, dtype=dtype)
        self.k_proj = linear(D, D, ("embed", "heads"), bias=True, rngs=rngs, dtype=dtype)
        self.v_proj = linear(D, D, ("embed", "heads"), bias=True, rngs=rngs, dtype=dtype)
        self.out_proj = linear(D, D, ("heads", "embed"), bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x_NPD, impl):
        N, P, D = x_NPD.shape
        split = lambda y: y.reshape(N, P, self.num_heads, self.head_dim)  # noqa: E731
        # bidirectional within each tile: every tile is one attention row of P valid keys
        mask = attn_lib.MaskSpec(kv_len_B=jnp.full((N,), P, jnp.int32))
        o = attn_lib.attention(split(self.q_proj(x_NPD)), split(self.k_proj(x_NPD)), split(self.v_proj(x_NPD)),
                               mask, impl=impl)
        return self.out_proj(o.reshape(N, P, D))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs, dtype):
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), bias=True, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs, dtype):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = SiglipAttention(cfg, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = SiglipMLP(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x_NPD, impl):
        x_NPD = x_NPD + self.self_attn(self.layer_norm1(x_NPD), impl)
        return x_NPD + self.mlp(self.layer_norm2(x_NPD))


class SiglipEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs, dtype):
        self.cfg = cfg
        # Conv2d with stride = kernel is a Linear on (C, ph, pw)-flattened patches.
        self.patch_embedding = linear(cfg.patch_dim, cfg.hidden_size, ("patch", "embed"), bias=True, rngs=rngs,
                                      dtype=dtype)
        self.position_embedding = embed(cfg.grid**2, cfg.hidden_size, ("positions", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, pixels_NCHW):
        c = self.cfg
        N, G, p = pixels_NCHW.shape[0], c.grid, c.patch_size
        x = pixels_NCHW[:, :, :G * p, :G * p].reshape(N, c.num_channels, G, p, G, p).transpose(0, 2, 4, 1, 3, 5)
        x = x.reshape(N, G * G, c.patch_dim).astype(self.patch_embedding.kernel.dtype)
        return self.patch_embedding(x) + self.position_embedding.embedding[...][None]


class SiglipEncoder(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs, dtype):
        self.layers = nnx.List([SiglipEncoderLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_hidden_layers)])


class SiglipVisionTower(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs, dtype):
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg, rngs=rngs, dtype=dtype)
        self.encoder = SiglipEncoder(cfg, rngs=rngs, dtype=dtype)
        # Loaded for checkpoint fidelity; LLaVA takes its features before this norm.
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, pixels_NCHW, feature_layers=(-1,), impl: AttentionImpl = XLA):
        """Tiles [N, C, S, S] -> hidden states `feature_layers` (0 = embeddings, i = output of layer
        i, negative from the end) concatenated on the feature axis: [N, G^2, D * len]. Layers past
        the deepest one requested are not run."""
        L = self.cfg.num_hidden_layers
        want = [i % (L + 1) for i in feature_layers]
        x = self.embeddings(pixels_NCHW)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(want)]):
            x = layer(x, impl)
            states[i + 1] = x
        return jnp.concatenate([states[i] for i in want], axis=-1)


class MultiModalProjector(nnx.Module):
    def __init__(self, cfg: LlavaOneVisionConfig, *, rngs, dtype):
        din = cfg.vision.hidden_size * len(cfg.feature_layers)
        D = cfg.text.hidden_size
        self.linear_1 = linear(din, D, ("embed", "mlp"), bias=cfg.multimodal_projector_bias, rngs=rngs, dtype=dtype)
        self.linear_2 = linear(D, D, ("mlp", "embed"), bias=cfg.multimodal_projector_bias, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaOneVision(nnx.Module):
    """The target: SigLIP tower + projector + Qwen2 LM + LM head (absent when tied)."""

    def __init__(self, cfg: LlavaOneVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision, rngs=rngs, dtype=dtype)
        self.multi_modal_projector = MultiModalProjector(cfg, rngs=rngs, dtype=dtype)
        D = cfg.text.hidden_size
        self.image_newline = nnx.Param(jax.random.normal(rngs.params(), (D,), dtype) / math.sqrt(D),
                                       **axes_metadata("embed"))
        self.model = TextModel(cfg.text, rngs=rngs, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else linear(
            D, cfg.text.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs, dtype=dtype)

    # --- pieces the family-agnostic target API calls ---
    def embed(self, ids_BT):
        return self.model.embed_tokens(ids_BT)

    def logits(self, h_BTD):
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h_BTD)
        return self.lm_head(h_BTD)

    def rope(self, positions_3BT):
        """1-D RoPE: the three position streams are equal for this family; stream 0 is used."""
        t = self.cfg.text
        return rope_cos_sin_1d(positions_3BT[0], t.head_dim, t.rope_theta)

    def tile_features(self, pixels_NCHW, impl: AttentionImpl = XLA):
        """Projected features of every tile: [N, G^2, D_text]."""
        return self.multi_modal_projector(self.vision_tower(pixels_NCHW, self.cfg.feature_layers, impl))

    def encode_visuals(self, pixels_NCHW, layout: LlavaVisionLayout, impl: AttentionImpl = XLA):
        """All tiles of the batch [N, C, S, S] -> the visual LM tokens [M, D] in batch order."""
        return self.combine_chunks(self.encode_chunk(pixels_NCHW, None, impl), layout)

    # --- the same in bounded memory (target.encode_visuals_chunked): chunks of whole tiles ---
    def visual_chunks(self, pixels_NCHW, layout: LlavaVisionLayout, chunk_patches: int):
        """Host: (tiles [K, C, S, S] (a view, or zero-padded to K), None, valid output rows) per tower
        call: K tiles within `chunk_patches` SigLIP patches (at least 1; SigLIP sees one tile at a time)."""
        per_tile = self.cfg.vision.grid ** 2
        N = pixels_NCHW.shape[0]
        K = min(N, max(1, chunk_patches // per_tile))
        for start in range(0, N, K):
            tiles = pixels_NCHW[start:start + K]
            n = tiles.shape[0]
            if n < K:
                tiles = np.concatenate([tiles, np.zeros((K - n,) + tiles.shape[1:], tiles.dtype)])
            yield tiles, None, n * per_tile

    def encode_chunk(self, pixels_NCHW, layout=None, impl: AttentionImpl = XLA):
        """Tiles -> their projected patch features, flattened [N * G^2, D] (the table `combine_chunks` reads)."""
        feats = self.tile_features(pixels_NCHW, impl)
        return feats.reshape(-1, feats.shape[-1])

    def combine_chunks(self, feats_RD, layout: LlavaVisionLayout):
        """Every tile's patch features [N * G^2, D] -> the visual LM tokens [M, D]: each token a weighted sum
        of 4 table rows (bilinear taps; row 0 is image_newline)."""
        table = jnp.concatenate([self.image_newline[...][None].astype(feats_RD.dtype), feats_RD])
        out = jnp.einsum("mk,mkd->md", layout.src_w, table[layout.src_idx], preferred_element_type=jnp.float32)
        return out.astype(feats_RD.dtype)


# --------------------------------------------------------------------------------- batch building


TILE_BUCKET = 8  # the batch's SigLIP tiles are zero-padded to a multiple of this (one compile per bucket)


def prepare_prefill_batch(prompts, cfg: LlavaOneVisionConfig, *, seq_bucket: int | None = None, dtype=np.float32):
    """Host-side: B prompts (objects with input_ids, mm_token_type_ids (0 text, 1 image, 2 video) and
    visuals in prompt order — see `sparrow_jax.io.llava_inputs`) -> a right-padded `PrefillBatch`.
    Positions are 0..T-1 in all three streams (1-D RoPE), rope delta 0. Tiles are padded to
    `TILE_BUCKET`, visual tokens to `SEQ_BUCKET` (padded tokens are written nowhere)."""
    from sparrow_jax.models.target import PrefillBatch, bucket  # noqa: PLC0415

    B = len(prompts)
    if B == 0:
        raise ValueError("prepare_prefill_batch: no prompts")
    lens = [len(p.input_ids) for p in prompts]
    T = bucket(max(lens)) if seq_bucket is None else bucket(max(lens), seq_bucket)
    ids = np.zeros((B, T), np.int32)
    text_idx, vis_idx, dest, visuals = [], [], [], []
    for b, p in enumerate(prompts):
        n = lens[b]
        row = np.asarray(p.input_ids)
        ids[b, :n] = row
        types = np.asarray(p.mm_token_type_ids)
        if types.shape != (n,):
            raise ValueError(f"prompt {b}: mm_token_type_ids shape {types.shape} != input_ids ({n},)")
        for code, tok, name in ((1, cfg.image_token_id, "image"), (2, cfg.video_token_id, "video")):
            if not np.array_equal(types == code, row == tok):
                raise ValueError(f"prompt {b}: {name} token ids ({tok}) and mm_token_type_ids == {code} disagree")
        text_idx.append(np.nonzero(types == 0)[0])
        vis = np.nonzero(types != 0)[0]
        vis_idx.append(vis)
        dest.append(b * T + vis)
        row_visuals = list(p.visuals)
        _, counts = vision_layout(row_visuals, cfg) if row_visuals else (None, [])
        if sum(counts) != len(vis):
            raise ValueError(f"prompt {b}: {len(vis)} image/video placeholders but its visuals give {sum(counts)} "
                             f"tokens {counts}")
        start = 0  # each visual takes the next `count` placeholders: contiguous and of its kind
        for i, (v, c) in enumerate(zip(row_visuals, counts)):
            pos_i = vis[start:start + c]
            if pos_i[-1] - pos_i[0] != c - 1 or np.any(types[pos_i] != (1 if v.kind == "image" else 2)):
                raise ValueError(f"prompt {b}: visual {i} ({v.kind}, {c} tokens) does not match a contiguous run of "
                                 f"its placeholders")
            start += c
        visuals.extend(row_visuals)

    def pad_rows(rows):
        L = bucket(max(max((len(r) for r in rows), default=0), 1))
        out = np.zeros((B, L), np.int32)
        for b, r in enumerate(rows):
            out[b, :len(r)] = r
        return out, np.asarray([len(r) for r in rows], np.int32)

    text_idx_BL, text_len = pad_rows(text_idx)
    vis_idx_BM, vis_len = pad_rows(vis_idx)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, B, T))
    has_vis = bool(visuals)
    if has_vis:  # pad tiles and visual tokens to buckets: fewer executables across batches
        # one host copy, padded in place (`target.prefill` moves it to the device chunk by chunk)
        parts = [np.asarray(v.pixel_values) for v in visuals]
        tiles = np.zeros((bucket(sum(len(x) for x in parts), TILE_BUCKET),) + parts[0].shape[1:], dtype)
        start = 0
        for x in parts:
            tiles[start:start + len(x)] = x
            start += len(x)
        layout = vision_layout(visuals, cfg)[0]
        dest = np.concatenate(dest)
        M = bucket(len(dest))
        # padded tokens: weight 0, destination b*T + t out of range -> dropped by the scatter
        dest = np.concatenate([dest, np.full(M - len(dest), B * T)])
        layout = LlavaVisionLayout(jnp.pad(layout.src_idx, ((0, M - len(layout.src_idx)), (0, 0))),
                                   jnp.pad(layout.src_w, ((0, M - len(layout.src_w)), (0, 0))))
    return PrefillBatch(
        input_ids_BT=jnp.asarray(ids), lengths_B=jnp.asarray(lens, jnp.int32), positions_3BT=jnp.asarray(pos),
        rope_delta_B=jnp.zeros((B,), jnp.int32), text_idx_BL=jnp.asarray(text_idx_BL),
        text_len_B=jnp.asarray(text_len), vis_idx_BM=jnp.asarray(vis_idx_BM), vis_len_B=jnp.asarray(vis_len),
        pixels_PC=tiles if has_vis else None,
        vision_layout=layout if has_vis else None,
        visual_dest=jnp.asarray(dest, jnp.int32) if has_vis else None,
    )

