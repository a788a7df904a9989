"""Qwen2.5-VL in Flax NNX: vision tower (windowed + full-attention blocks, 2-D RoPE, patch merger),
the Qwen2 language model with M-RoPE (`qwen2_lm`), and the target hooks the speculation API calls.

Module attribute names mirror the HF checkpoint keys so `checkpoint` can map them mechanically.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.layers import GatedMLP, RMSNorm, apply_rope, linear, mrope_cos_sin, rope_inv_freq
from sparrow_jax.models.qwen2_5_vl.batching import (SegmentLayout, VisionLayout, chunk_dims, chunk_layout,
                                                    pad_chunk_layout, vision_chunks)
from sparrow_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from sparrow_jax.models.qwen2_lm import Qwen2LMTarget, TextModel


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



class Qwen25VL(Qwen2LMTarget, nnx.Module):
    """The target: vision tower + Qwen2 LM + LM head. Holds no state besides parameters."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, rngs=rngs, dtype=dtype)
        self.model = TextModel(cfg.text, rngs=rngs, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else linear(
            cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs, dtype=dtype)

    # --- the target hooks (family.TargetModel); embed, decoder, layer_queries, logits: Qwen2LMTarget ---
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
            yield pixels, chunk_layout(G, h, w, self.cfg.vision), rows // m2

    def encode_chunk(self, pixels_PC, layout, impl: AttentionImpl = XLA):
        return self.visual(pixels_PC, layout, impl)

    def combine_chunks(self, feats_MD, layout):
        """The chunks' outputs, concatenated, already are the visual tokens in order."""
        return feats_MD

    # --- chunks of different frame sizes in one shape (online training stacks every row's frame groups) ---
    def chunk_dims(self, pixels_PC, layout: VisionLayout):
        """Host: the chunk's growable sizes (`batching.chunk_dims`)."""
        return chunk_dims(layout)

    def pad_chunk(self, pixels_PC, layout: VisionLayout, dims):
        """Host: the chunk grown to `dims`; `encode_chunk`'s first rows stay the chunk's own."""
        return pad_chunk_layout(pixels_PC, layout, dims)

