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

Module attribute names mirror the HF checkpoint keys (see `checkpoint`). The config lives in `config`,
the host-side layouts and the batch builder in `batching`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.layers import activation, axes_metadata, embed, linear, rope_cos_sin_1d
from sparrow_jax.models.llava_onevision.batching import LlavaVisionLayout
from sparrow_jax.models.llava_onevision.config import LlavaOneVisionConfig, SiglipVisionConfig
from sparrow_jax.models.qwen2_lm import Qwen2LMTarget, TextModel

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


class LlavaOneVision(Qwen2LMTarget, nnx.Module):
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

    # --- the target hooks (family.TargetModel); embed, decoder, layer_queries, logits: Qwen2LMTarget ---
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

    def chunk_dims(self, tiles_NCHW, layout=None):
        """Host: nothing to grow (every tile has the tower's one input size)."""
        return ()

    def pad_chunk(self, tiles_NCHW, layout, dims):
        return tiles_NCHW, layout
