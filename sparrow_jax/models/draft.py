"""The Sparrow draft (SPEC §1): HSR input z_t = FC([RMSNorm(e_t); h_{t-1}]), N decoder layers of the
target's LM family (the first without input norm, no final norm). The target's embedding and LM head
are shared and frozen: the engine passes embeddings in and applies the target's head to the output.

The draft sees a sequence of items with plain 1-D RoPE over its own positions: text items (e_t, h_{t-1})
through the FC, and, depending on its *visual view* (models/views.py), visual items that bypass the FC.
The sequence starts at (t1, h0) (official convention). The view is fixed by training and stored here.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from sparrow_jax.models import views
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.config_io import read_config_json
from sparrow_jax.models.layers import DecoderLayer, RMSNorm, linear, rope_cos_sin_1d


class DraftConfigError(ValueError):
    """A draft that cannot be built or does not fit its target."""


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # the target's (the head is shared)
    num_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    hidden_act: str = "silu"
    qkv_bias: bool = True  # Qwen2 family
    normalize_embeddings: bool = True  # Sparrow's RMSNorm(e_t); EAGLE-1 drafts feed e_t raw
    family: str = "qwen2"
    # What the draft was trained to see (models/views.py); the engine refuses other views by default.
    visual_view: str = "none"
    m_star: int | None = None  # target layer of the visual bridge in training (None: the target's default)
    visual_keep_fraction: float = views.DEFAULT_KEEP_FRACTION  # pruned view only
    visual_prune_by: str = "uniform"  # pruned view only: "uniform" or "attention"

    def __post_init__(self):
        try:
            views.check_view(self.visual_view, "DraftConfig.visual_view")
            views.check_prune(self.visual_keep_fraction, self.visual_prune_by, "DraftConfig")
        except ValueError as e:
            raise DraftConfigError(str(e)) from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def for_target(cls, target_cfg, **overrides) -> "DraftConfig":
        """A draft shaped like one layer of the target's LM (the paper's default)."""
        t = target_cfg.text
        base = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                    vocab_size=t.vocab_size, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                    hidden_act=t.hidden_act, family="qwen2")
        base.update(overrides)
        return cls(**base)

    def check_fits(self, target_cfg, source: str = "draft") -> None:
        """Refuse a draft whose hidden size, vocabulary or family does not match the target."""
        t = target_cfg.text
        problems = []
        if self.hidden_size != t.hidden_size:
            problems.append(f"hidden size {self.hidden_size} != target {t.hidden_size}")
        if self.vocab_size != t.vocab_size:
            problems.append(f"vocab {self.vocab_size} != target {t.vocab_size}")
        if self.family != "qwen2":
            problems.append(f"family {self.family!r} != target LM family 'qwen2'")
        if self.m_star is not None and not 0 < self.m_star < target_cfg.num_layers:
            problems.append(f"m_star {self.m_star} is not inside the target's {target_cfg.num_layers} layers")
        if problems:
            raise DraftConfigError(f"{source} does not fit target {target_cfg.family}: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {"architectures": ["SparrowDraft"], "model_type": "sparrow_draft", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "DraftConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if "num_layers" not in kw and "num_hidden_layers" in d:
            kw["num_layers"] = d["num_hidden_layers"]
        if "qkv_bias" not in kw and "attention_bias" in d:  # EAGLE's own `bias` is the fc bias, not q/k/v
            kw["qkv_bias"] = bool(d["attention_bias"])
        if "rope_theta" not in kw and isinstance(d.get("rope_parameters"), dict):
            kw["rope_theta"] = d["rope_parameters"].get("rope_theta", 1e6)
        missing = [f for f in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if f not in kw]
        if missing:
            raise DraftConfigError(f"{source}: missing field(s) {missing}")
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        try:
            return cls(**kw)
        except TypeError as e:
            raise DraftConfigError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, path) -> "DraftConfig":
        d, source = read_config_json(path, DraftConfigError, "a draft checkpoint directory")
        return cls.from_dict(d, source=source)


class SparrowDraft(nnx.Module):
    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        H = cfg.hidden_size
        self.embed_norm = RMSNorm(H, cfg.rms_norm_eps, dtype=dtype) if cfg.normalize_embeddings else None
        self.fc = linear(2 * H, H, ("embed2", "embed"), bias=True, rngs=rngs, dtype=dtype)  # [e; h] in
        self.layers = nnx.List([
            DecoderLayer(dim=H, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, mlp_dim=cfg.intermediate_size, act=cfg.hidden_act,
                         eps=cfg.rms_norm_eps, qkv_bias=cfg.qkv_bias, rngs=rngs, dtype=dtype, input_norm=i > 0)
            for i in range(cfg.num_layers)
        ])

    def hsr_input(self, e_BTD, hprev_BTD):
        """z_t = FC([RMSNorm(e_t); h_{t-1}])."""
        e = self.embed_norm(e_BTD) if self.embed_norm is not None else e_BTD
        return self.fc(jnp.concatenate([e, hprev_BTD.astype(e.dtype)], axis=-1))

    def view_input(self, e_BTD, hprev_BTD, is_text_BT):
        """Draft inputs of a view's items: z_t on text items; a visual item's state (given in e_BTD)
        goes in as is, bypassing the FC."""
        z_BTD = self.hsr_input(e_BTD, hprev_BTD)
        return jnp.where(is_text_BT[..., None], z_BTD, e_BTD.astype(z_BTD.dtype))

    def __call__(self, e_BTD, hprev_BTD, positions_BT, mask, caches=None, impl: AttentionImpl = XLA, block_prefix=None):
        """Returns the draft output states ĥ [B, T, D] (feed them to the target's LM head) and the
        new K/V per layer. `caches`: per-layer committed (k, v); `block_prefix`: per-layer K/V of
        uncommitted tree nodes placed before this block (visibility in `mask.block_mask_BTN`)."""
        return self.run_layers(self.hsr_input(e_BTD, hprev_BTD), positions_BT, mask, caches, impl, block_prefix)

    def run_layers(self, x_BTD, positions_BT, mask, caches=None, impl: AttentionImpl = XLA, block_prefix=None):
        """The decoder layers on already-built inputs (training mixes HSR inputs with IVSB visual slots)."""
        x = x_BTD
        cos, sin = rope_cos_sin_1d(positions_BT, self.cfg.head_dim, self.cfg.rope_theta)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, None if caches is None else caches[i], impl,
                          None if block_prefix is None else block_prefix[i])
            new_kv.append(kv)
        return x, tuple(new_kv)
