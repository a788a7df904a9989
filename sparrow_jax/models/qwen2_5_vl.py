"""Qwen2.5-VL in Flax NNX: vision tower (windowed + full-attention blocks, 2-D RoPE, patch merger),
Qwen2 language model with M-RoPE, and the host-side index math (rope index, vision layout).

Module attribute names mirror the HF checkpoint keys so `sparrow_jax.io.hf_checkpoint` can map them
mechanically. Host-side helpers are numpy: they depend only on token ids and grid sizes, which are
known before the jitted call, and fix the shapes of one compiled executable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.layers import (DecoderLayer, GatedMLP, RMSNorm, apply_rope, embed, linear, mrope_cos_sin,
                                      rope_inv_freq)

# ----------------------------------------------------------------------------------------- configs


class ConfigError(ValueError):
    """A config.json that cannot describe a model we support."""


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
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


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
        from sparrow_jax.models.config_io import read_config_json  # noqa: PLC0415

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


# ------------------------------------------------------------------------------ host-side layouts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """Contiguous attention segments gathered into a padded [n_seg, L] block (the segments become the
    batch axis of `attention`), and each token's slot in that block for the way back."""

    gather_idx: jax.Array  # [n_seg, L] token index (0 where padded)
    seg_len: jax.Array  # [n_seg]
    token_slot: jax.Array  # [n_tokens] = seg * L + offset


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Everything the vision tower needs besides pixels, for a fixed list of grids."""

    patch_perm: jax.Array  # [P] window order of patches (merge units stay together)
    rot_pos: jax.Array  # [P, 2] (h, w) rotary positions, already in window order
    full: SegmentLayout  # per-frame segments (fullatt blocks)
    window: SegmentLayout  # per-window segments (other blocks)
    merged_unperm: jax.Array  # [P / merge^2] back to raster order after the merger
    # [n_groups, 2] (h, w) patches of each frame group (temporal patch), in pixel-row order: the units
    # the tower can be run on separately (`vision_chunks`); unused inside the tower
    group_hw: jax.Array


def _segment_layout(seg_lens) -> SegmentLayout:
    seg_lens = np.asarray([s for s in seg_lens if s > 0], np.int64)
    L = int(seg_lens.max())
    starts = np.concatenate([[0], np.cumsum(seg_lens)[:-1]])
    offs = np.arange(L)
    gather = starts[:, None] + offs[None, :]
    gather = np.where(offs[None, :] < seg_lens[:, None], gather, 0)
    seg_of_tok = np.repeat(np.arange(len(seg_lens)), seg_lens)
    off_of_tok = np.arange(seg_lens.sum()) - np.repeat(starts, seg_lens)
    return SegmentLayout(jnp.asarray(gather, jnp.int32), jnp.asarray(seg_lens, jnp.int32),
                         jnp.asarray(seg_of_tok * L + off_of_tok, jnp.int32))


def vision_layout(grids_thw, vcfg: VisionConfig) -> VisionLayout:
    """Window reordering, rotary ids and attention segments for a list of (t, h, w) patch grids,
    as transformers' `get_vision_window_index` / `get_vision_position_ids` / cu_seqlens define them."""
    m = vcfg.spatial_merge_size
    unit = m * m
    win = vcfg.window_size // m // vcfg.patch_size
    window_index, win_lens, frame_lens, rot, group_hw = [], [], [], [], []
    offset = 0
    for t, h, w in grids_thw:
        lh, lw = h // m, w // m
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = win - lh % win, win - lw % win
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        win_lens.extend(((padded != -100).sum(-1).reshape(-1) * unit).tolist())
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        offset += t * lh * lw
        frame_lens.extend([h * w] * t)
        group_hw.extend([(h, w)] * t)
        hp, wp = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hp = hp.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        wp = wp.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        rot.append(np.tile(np.stack([hp, wp], -1), (t, 1)))
    window_index = np.concatenate(window_index)
    patch_perm = (window_index[:, None] * unit + np.arange(unit)[None]).reshape(-1)
    rot = np.concatenate(rot)[patch_perm]
    return VisionLayout(
        patch_perm=jnp.asarray(patch_perm, jnp.int32), rot_pos=jnp.asarray(rot, jnp.int32),
        full=_segment_layout(frame_lens), window=_segment_layout(win_lens),
        merged_unperm=jnp.asarray(np.argsort(window_index), jnp.int32),
        group_hw=jnp.asarray(np.asarray(group_hw, np.int32).reshape(-1, 2)),
    )


@functools.lru_cache(maxsize=64)
def _chunk_layout(groups: int, h: int, w: int, vcfg: VisionConfig) -> VisionLayout:
    """The layout of `groups` frame groups of h x w patches: the same for every chunk of that shape."""
    return vision_layout([(groups, h, w)], vcfg)


def vision_chunks(group_hw, vcfg: VisionConfig, chunk_patches: int):
    """Split frame groups (temporal patches; [n, 2] their (h, w) in pixel-row order) into tower calls of
    at most ~`chunk_patches` patches. Frame groups are independent in the tower (windows and full-attention
    segments never cross one; rotary positions restart in each), so consecutive groups of one size can run
    as one (G, h, w) grid, whichever visual they come from. G is the largest group count within
    `chunk_patches` (at least 1), or for a shorter run the next power of two: few shapes, few compiles.
    Returns [(first row, rows, G, h, w, valid groups)]; a chunk with fewer valid groups than G is padded."""
    group_hw = np.asarray(group_hw).reshape(-1, 2)
    out, g, row = [], 0, 0
    while g < len(group_hw):
        h, w = (int(x) for x in group_hw[g])
        run = 1
        while g + run < len(group_hw) and tuple(group_hw[g + run]) == (h, w):
            run += 1
        most = max(1, chunk_patches // (h * w))
        for start in range(0, run, most):
            valid = min(most, run - start)
            G = most if run > most else min(most, 1 << (valid - 1).bit_length())
            out.append((row, valid * h * w, G, h, w, valid))
            row += valid * h * w
        g += run
    return out


def rope_index(input_ids, mm_token_type_ids, grids_thw, second_per_grid_ts, cfg: Qwen25VLConfig):
    """3-D M-RoPE positions [3, T] and decode delta for one unpadded row, as transformers 5.23's
    `get_rope_index`: text runs count up by 1; a visual block starts at the running position p,
    t = p + floor(i * tokens_per_second * second_per_grid_t) (images: interval 1), h/w = p + index on
    the merged grid; text after the block resumes at p + max(h, w) / merge.

    Decode delta: generated token at cache slot i sits at position i + delta with
    delta = last prompt position + 1 - T, i.e. text continues from the last prompt token. This is what
    a full forward over prompt + generated text computes and what transformers 5.23 `generate` does;
    it differs from `get_rope_index`'s own delta (max over all positions + 1 - T) when a video's
    temporal positions run past the last text position."""
    types = np.asarray(mm_token_type_ids)
    m = cfg.vision.spatial_merge_size
    grids, secs = iter(grids_thw), iter(second_per_grid_ts)
    pos, cur = [], 0
    for key, group in itertools.groupby(enumerate(types.tolist()), lambda x: x[1]):
        group = list(group)
        n = len(group)
        if key == 0:
            pos.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
            cur += n
            continue
        t, h, w = next(grids)
        sec = next(secs)
        # float32 like torch: (arange(t) * (tokens_per_second * second_per_grid_t)).long()
        interval = np.float32(cfg.vision.tokens_per_second) * np.float32(sec) if key == 2 else np.float32(1)
        lt, lh, lw = t, h // m, w // m
        if lt * lh * lw != n:
            raise ValueError(f"visual block of {n} tokens does not match grid {(t, h, w)} ({lt * lh * lw} tokens)")
        tt = (np.arange(lt, dtype=np.float32) * interval).astype(np.int64)
        T_, H_, W_ = np.meshgrid(tt, np.arange(lh) + cur, np.arange(lw) + cur, indexing="ij")
        pos.append(np.stack([T_.reshape(-1) + cur, H_.reshape(-1), W_.reshape(-1)]))
        cur += max(h, w) // m
    pos = np.concatenate(pos, axis=1) if pos else np.zeros((3, 0), np.int64)
    delta = int(pos[:, -1].max()) + 1 - pos.shape[1] if pos.size else 0
    return pos.astype(np.int32), delta


# ------------------------------------------------------------------------------------------ modules


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, dtype):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, ("embed", "heads"), bias=True, rngs=rngs, dtype=dtype)
        self.proj = linear(cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x_PD, cos_PE, sin_PE, seg: SegmentLayout, impl):
        P = x_PD.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x_PD).reshape(P, 3, self.num_heads, self.head_dim), 1, 0)
        q = apply_rope(q[None], cos_PE[None], sin_PE[None])[0]
        k = apply_rope(k[None], cos_PE[None], sin_PE[None])[0]
        gather = lambda x: x[seg.gather_idx]  # noqa: E731  [n_seg, L, heads, E]
        o = attn_lib.attention(gather(q), gather(k), gather(v), attn_lib.MaskSpec(kv_len_B=seg.seg_len), impl=impl)
        o_PHE = o.reshape(-1, self.num_heads, self.head_dim)[seg.token_slot]
        return self.proj(o_PHE.reshape(P, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, dtype):
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x_PD, cos, sin, seg, impl):
        x_PD = x_PD + self.attn(self.norm1(x_PD), cos, sin, seg, impl)
        return x_PD + self.mlp(self.norm2(x_PD))


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, dtype):
        self.unit_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.fc1 = linear(self.unit_dim, self.unit_dim, ("embed", "mlp"), bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = linear(self.unit_dim, cfg.out_hidden_size, ("mlp", "embed"), bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x_PD):
        x = self.ln_q(x_PD).reshape(-1, self.unit_dim)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, dtype):
        self.cfg = cfg
        self.patch_embed = linear(cfg.patch_dim, cfg.hidden_size, ("patch", "embed"), bias=False, rngs=rngs, dtype=dtype)
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, pixels_PC, layout: VisionLayout, impl: AttentionImpl = XLA, return_block_states=False):
        """pixels [P, C*tp*p*p] (all visuals concatenated) -> merged features [P/merge^2, out]."""
        x = self.patch_embed(pixels_PC.astype(self.patch_embed.kernel.dtype))[layout.patch_perm]
        inv = rope_inv_freq(self.cfg.head_dim // 2, self.cfg.rope_theta)
        f = layout.rot_pos.astype(jnp.float32)[..., None] * inv  # [P, 2, E/4]
        f = jnp.concatenate([f[:, 0], f[:, 1]], -1)
        emb = jnp.concatenate([f, f], -1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        states = []
        for i, blk in enumerate(self.blocks):
            seg = layout.full if i in self.cfg.fullatt_block_indexes else layout.window
            x = blk(x, cos, sin, seg, impl)
            states.append(x)
        out = self.merger(x)[layout.merged_unperm]
        return (out, states) if return_block_states else out


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, dtype):
        self.cfg = cfg
        self.embed_tokens = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs, dtype=dtype)
        self.layers = nnx.List([
            DecoderLayer(dim=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, mlp_dim=cfg.intermediate_size, act=cfg.hidden_act,
                         eps=cfg.rms_norm_eps, qkv_bias=True, rngs=rngs, dtype=dtype)
            for _ in range(cfg.num_hidden_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x_BTD, cos, sin, mask, caches=None, impl: AttentionImpl = XLA, capture=(), key_visible_LBS=None):
        """Returns (final-norm hidden, per-layer new (k, v), {i: hidden state i for i in capture}).
        Hidden state 0 = input embeddings, i = output of layer i (transformers' numbering).
        key_visible_LBS: optional per-layer main-key visibility [layers, B, S] (MaskSpec.key_visible_BS;
        the internalization study only)."""
        captured, new_kv = ({0: x_BTD} if 0 in capture else {}), []
        for i, layer in enumerate(self.layers):
            m = mask if key_visible_LBS is None else dataclasses.replace(mask, key_visible_BS=key_visible_LBS[i])
            x_BTD, kv = layer(x_BTD, cos, sin, m, None if caches is None else caches[i], impl)
            new_kv.append(kv)
            if i + 1 in capture:
                captured[i + 1] = x_BTD
        return self.norm(x_BTD), tuple(new_kv), captured


class Qwen25VL(nnx.Module):
    """The target: vision tower + Qwen2 LM + LM head. Holds no state besides parameters."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, rngs=rngs, dtype=dtype)
        self.model = TextModel(cfg.text, rngs=rngs, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else linear(
            cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs, dtype=dtype)

    # --- pieces the family-agnostic target API calls ---
    def embed(self, ids_BT):
        return self.model.embed_tokens(ids_BT)

    def logits(self, h_BTD):
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h_BTD)
        return self.lm_head(h_BTD)

    def rope(self, positions_3BT):
        t = self.cfg.text
        return mrope_cos_sin(positions_3BT, t.head_dim, t.rope_theta, t.mrope_section)

    def encode_visuals(self, pixels_PC, layout, impl: AttentionImpl = XLA):
        return self.visual(pixels_PC, layout, impl)

    # --- the same in bounded memory (target.encode_visuals_chunked): chunks of whole frame groups ---
    def visual_chunks(self, pixels_PC, layout: VisionLayout, chunk_patches: int):
        """Host: (pixels [G*h*w, C] (a view, or zero-padded to whole G), chunk layout, valid output rows)
        per tower call, in order; see `vision_chunks`."""
        m2 = self.cfg.vision.spatial_merge_size ** 2
        for row, rows, G, h, w, _ in vision_chunks(layout.group_hw, self.cfg.vision, chunk_patches):
            pixels = pixels_PC[row:row + rows]
            if rows < G * h * w:
                pixels = np.concatenate([pixels, np.zeros((G * h * w - rows, pixels.shape[1]), pixels.dtype)])
            yield pixels, _chunk_layout(G, h, w, self.cfg.vision), rows // m2

    def encode_chunk(self, pixels_PC, layout, impl: AttentionImpl = XLA):
        return self.visual(pixels_PC, layout, impl)

    def combine_chunks(self, feats_MD, layout):
        """The chunks' outputs, concatenated, already are the visual tokens in order."""
        return feats_MD


# --------------------------------------------------------------------------------- batch building


def prepare_prefill_batch(prompts, cfg: Qwen25VLConfig, *, seq_bucket: int | None = None, dtype=np.float32):
    """Host-side: B prompts (objects with input_ids, mm_token_type_ids, visuals — see
    `sparrow_jax.io.vision_inputs.MultimodalPrompt`) -> a right-padded `PrefillBatch`."""
    from sparrow_jax.models.target import PrefillBatch, bucket  # noqa: PLC0415

    B = len(prompts)
    if B == 0:
        raise ValueError("prepare_prefill_batch: no prompts")
    lens = [len(p.input_ids) for p in prompts]
    T = bucket(max(lens)) if seq_bucket is None else bucket(max(lens), seq_bucket)
    ids = np.zeros((B, T), np.int32)
    pos = np.zeros((3, B, T), np.int32)
    delta = np.zeros((B,), np.int32)
    text_idx, vis_idx, dest, pixels, grids = [], [], [], [], []
    for b, p in enumerate(prompts):
        n = lens[b]
        ids[b, :n] = p.input_ids
        types = np.asarray(p.mm_token_type_ids)
        if types.shape != (n,):
            raise ValueError(f"prompt {b}: mm_token_type_ids shape {types.shape} != input_ids ({n},)")
        visuals = list(p.visuals)
        row_grids = [tuple(v.grid_thw) for v in visuals]
        secs = [getattr(v, "second_per_grid_t", 1.0) for v in visuals]
        pos[:, b, :n], delta[b] = rope_index(p.input_ids, types, row_grids, secs, cfg)
        pos[:, b, n:] = pos[:, b, n - 1:n] + 1 + np.arange(T - n)  # padding positions: harmless, masked
        text_idx.append(np.nonzero(types == 0)[0])
        vis = np.nonzero(types != 0)[0]
        vis_idx.append(vis)
        dest.append(b * T + vis)
        for v in visuals:
            pixels.append(np.asarray(v.pixel_values))
            grids.append(tuple(v.grid_thw))
        want = sum(t * h * w // cfg.vision.spatial_merge_size**2 for t, h, w in row_grids)
        if want != len(vis):
            raise ValueError(f"prompt {b}: {len(vis)} visual pad tokens but its visuals give {want} features")

    def pad_rows(rows):
        L = bucket(max(max((len(r) for r in rows), default=0), 1))
        out = np.zeros((B, L), np.int32)
        for b, r in enumerate(rows):
            out[b, :len(r)] = r
        return out, np.asarray([len(r) for r in rows], np.int32)

    text_idx_BL, text_len = pad_rows(text_idx)
    vis_idx_BM, vis_len = pad_rows(vis_idx)
    has_vis = bool(pixels)
    if has_vis:  # stays on the host (one visual: no copy): `target.prefill` moves it to the device chunk by chunk
        pixels = pixels[0].astype(dtype, copy=False) if len(pixels) == 1 else np.concatenate(pixels, dtype=dtype)
    return PrefillBatch(
        input_ids_BT=jnp.asarray(ids), lengths_B=jnp.asarray(lens, jnp.int32), positions_3BT=jnp.asarray(pos),
        rope_delta_B=jnp.asarray(delta), text_idx_BL=jnp.asarray(text_idx_BL), text_len_B=jnp.asarray(text_len),
        vis_idx_BM=jnp.asarray(vis_idx_BM), vis_len_B=jnp.asarray(vis_len),
        pixels_PC=pixels if has_vis else None,
        vision_layout=vision_layout(grids, cfg.vision) if has_vis else None,
        visual_dest=jnp.asarray(np.concatenate(dest), jnp.int32) if has_vis else None,
    )
