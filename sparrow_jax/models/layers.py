"""Building blocks shared by every model family (targets and drafts).

Shape suffixes: B batch, T query length, S key length, N tree/block length, D model width,
H query heads, K kv heads, E head dim, F MLP width, V vocab.
Weights keep torch's math but JAX's layout: a Linear kernel is [in, out].

Every parameter declares its logical axes where it is made (`axes_metadata`, one name per dimension:
'embed', 'heads', 'kv_heads', 'mlp', 'vocab', 'norm', ...); `sparrow_jax.training.sharding.RULES` maps
them to mesh axes. Nothing is inferred from parameter names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import XLA, AttentionImpl

# Flax's own metadata key for a Variable's partitioning (nnx.with_partitioning writes it and
# nnx.get_partition_spec reads it); ours holds logical axis names, not mesh axes.
_AXES_KEY = "out_sharding"


def axes_metadata(*axes: str) -> dict:
    """Variable metadata declaring a parameter's logical axes. Eager sharding stays off: models are
    built outside any mesh, and the trainer places parameters from these axes and the rules table."""
    return {_AXES_KEY: tuple(axes), "eager_sharding": False}


def declared_axes(variable) -> tuple[str, ...] | None:
    """The logical axes a parameter declared at creation (None: none declared)."""
    return variable.get_metadata(_AXES_KEY, None)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN names (activations.py), all but the learnable ones (prelu, xielu). The gelu_new /
# gelu_fast / gelu_accurate / *_tanh variants are the tanh approximation written in different ways.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "hardswish": jax.nn.hard_swish,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, cast back before the scale (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), **axes_metadata("norm"))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def linear(din: int, dout: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32,
           std: float = 0.02):
    """A Linear whose kernel [in, out] has logical axes `axes`; its bias follows the output axis."""
    return nnx.Linear(
        din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros,
        kernel_metadata=axes_metadata(*axes), bias_metadata=axes_metadata(axes[1]),
    )


def embed(num: int, dim: int, axes: tuple[str, str], *, rngs: nnx.Rngs, dtype=jnp.float32, std: float = 0.02):
    """An embedding table [num, dim] with logical axes `axes`."""
    return nnx.Embed(num, dim, dtype=dtype, param_dtype=dtype, rngs=rngs, embedding_init=nnx.initializers.normal(std),
                     embedding_metadata=axes_metadata(*axes))


class GatedMLP(nnx.Module):
    """SwiGLU-style MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str, *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.gate_proj = linear(dim, hidden, ("embed", "mlp"), bias=bias, rngs=rngs, dtype=dtype)
        self.up_proj = linear(dim, hidden, ("embed", "mlp"), bias=bias, rngs=rngs, dtype=dtype)
        self.down_proj = linear(hidden, dim, ("mlp", "embed"), bias=bias, rngs=rngs, dtype=dtype)
        self.act = activation(act)

    def __call__(self, x_BTD):
        return self.down_proj(self.act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BTHE, cos_BTE, sin_BTE):
    """Rotary embedding in fp32 (rotate-half convention); cos/sin broadcast over heads."""
    x32 = x_BTHE.astype(jnp.float32)
    cos, sin = cos_BTE[..., None, :], sin_BTE[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x_BTHE.dtype)


def rope_inv_freq(rot_dim: int, theta: float):
    """inv_freq[i] = theta^(-2i/rot_dim), i < rot_dim/2."""
    return 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))


def rope_cos_sin_1d(positions_BT, head_dim: int, theta: float):
    """Plain 1-D RoPE tables [B, T, E] (used by the draft and by Qwen2 LMs)."""
    freqs = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(positions_3BT, head_dim: int, theta: float, mrope_section: tuple[int, ...]):
    """Multimodal RoPE: frequency slot i of the half-dim takes its angle from the (t, h, w)
    position stream assigned by `mrope_section` (chunks cycle t, h, w)."""
    assert sum(mrope_section) == head_dim // 2, (mrope_section, head_dim)
    freqs_3BTF = positions_3BT.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    chunks, start = [], 0
    for i, n in enumerate(mrope_section):
        chunks.append(freqs_3BTF[i % 3, ..., start:start + n])
        start += n
    freqs_BTF = jnp.concatenate(chunks, axis=-1)
    emb = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class SelfAttention(nnx.Module):
    """GQA self-attention with optional q/k/v bias. Returns the output and this call's new K/V,
    so callers own the cache (pure functions over explicit pytrees)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qkv_bias: bool, out_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = linear(dim, num_heads * head_dim, ("embed", "heads"), bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.k_proj = linear(dim, num_kv_heads * head_dim, ("embed", "kv_heads"), bias=qkv_bias, rngs=rngs,
                             dtype=dtype)
        self.v_proj = linear(dim, num_kv_heads * head_dim, ("embed", "kv_heads"), bias=qkv_bias, rngs=rngs,
                             dtype=dtype)
        self.o_proj = linear(num_heads * head_dim, dim, ("heads", "embed"), bias=out_bias, rngs=rngs, dtype=dtype)

    def queries(self, x_BTD, cos_BTE, sin_BTE):
        """Roped queries [B, T, H, E] of (normed) input x: what this layer's attention scores with."""
        B, T, _ = x_BTD.shape
        return apply_rope(self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim), cos_BTE, sin_BTE)

    def __call__(self, x_BTD, cos_BTE, sin_BTE, mask: attn_lib.MaskSpec, cache_kv=None,
                 impl: AttentionImpl = XLA, block_prefix=None):
        B, T, _ = x_BTD.shape
        q_BTHE = self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim)
        k_BTKE = self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
        v_BTKE = self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
        q_BTHE = apply_rope(q_BTHE, cos_BTE, sin_BTE)
        k_BTKE = apply_rope(k_BTKE, cos_BTE, sin_BTE)
        if cache_kv is None:  # prefill / training: attend within the new sequence
            o_BTHE = attn_lib.attention(q_BTHE, k_BTKE, v_BTKE, mask, impl=impl)
        else:  # verify / decode: committed cache + the new block under its tree mask
            cache_k, cache_v = cache_kv
            block_k, block_v = k_BTKE, v_BTKE
            if block_prefix is not None:  # tree drafting: earlier uncommitted tree nodes precede the block
                block_k = jnp.concatenate([block_prefix[0], k_BTKE], axis=1)
                block_v = jnp.concatenate([block_prefix[1], v_BTKE], axis=1)
            o_BTHE = attn_lib.attention(q_BTHE, cache_k, cache_v, mask, block_k=block_k, block_v=block_v,
                                        impl=impl)
        out = self.o_proj(o_BTHE.reshape(B, T, self.num_heads * self.head_dim))
        return out, (k_BTKE, v_BTKE)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer of the Qwen2/Llama family. `input_norm=False` gives the draft's
    first layer (its input is already normalised by the FC)."""

    def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_dim: int,
                 act: str, eps: float, qkv_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32,
                 input_norm: bool = True):
        self.input_layernorm = RMSNorm(dim, eps, dtype=dtype) if input_norm else None
        self.self_attn = SelfAttention(dim, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias,
                                       out_bias=False, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(dim, eps, dtype=dtype)
        self.mlp = GatedMLP(dim, mlp_dim, act, bias=False, rngs=rngs, dtype=dtype)

    def queries(self, x_BTD, cos_BTE, sin_BTE):
        """Roped attention queries [B, T, H, E] of the layer's input hidden x."""
        h = self.input_layernorm(x_BTD) if self.input_layernorm is not None else x_BTD
        return self.self_attn.queries(h, cos_BTE, sin_BTE)

    def __call__(self, x_BTD, cos_BTE, sin_BTE, mask, cache_kv=None, impl: AttentionImpl = XLA, block_prefix=None):
        h = self.input_layernorm(x_BTD) if self.input_layernorm is not None else x_BTD
        a, new_kv = self.self_attn(h, cos_BTE, sin_BTE, mask, cache_kv, impl, block_prefix)
        x_BTD = x_BTD + a
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD, new_kv
