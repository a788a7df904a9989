"""The Qwen2 language model both target families run (Qwen2.5-VL's with M-RoPE, LLaVA-OneVision's
with 1-D RoPE): its config, the decoder stack, and `Qwen2LMTarget`, the LM half of a family module's
speculation hooks (embed, decoder, layer_queries, logits) for any family whose LM is this one."""

from __future__ import annotations

import dataclasses

from flax import nnx

from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.layers import DecoderLayer, RMSNorm, embed


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


    def layer_queries(self, layer: int, x_BTD, cos, sin):
        """Roped queries [B, T, H, E] of decoder layer `layer` for its input hidden x."""
        return self.layers[layer].queries(x_BTD, cos, sin)


class Qwen2LMTarget:
    """The target hooks that only touch the LM (mixed into a family module holding `model`, a
    TextModel, and `lm_head`, None when tied to the embedding)."""

    model: TextModel
    lm_head: nnx.Module | None

    def embed(self, ids_BT):
        return self.model.embed_tokens(ids_BT)

    def logits(self, h_BTD):
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h_BTD)
        return self.lm_head(h_BTD)

    def decoder(self, x_BTD, cos, sin, mask, *, caches=None, impl: AttentionImpl = XLA, capture=(),
                key_visible_LBS=None):
        """The decoder stack: (final-norm hidden, per-layer new (k, v), captured hidden states)."""
        return self.model(x_BTD, cos, sin, mask, caches=caches, impl=impl, capture=capture,
                          key_visible_LBS=key_visible_LBS)

    def layer_queries(self, layer: int, x_BTD, cos, sin):
        return self.model.layer_queries(layer, x_BTD, cos, sin)
