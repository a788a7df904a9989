"""Token selection shared by AR generation and speculative acceptance: one definition of the
target distribution (temperature -> top-k -> top-p, transformers' warper order).

Settings are host values (`SamplingParams`, one per row) turned into traced `[B]` arrays
(`SamplingArrays`) for the compiled loops: changing them never recompiles and rows may differ. Only
greedy vs sampling is static: `sampling=None` compiles the argmax path (no sort, no random draws)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One row's settings. temperature 0 means greedy (argmax). top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row settings as traced arrays (a row with temperature 0 is greedy: its distribution is the
    one-hot argmax, so mixed batches keep each row's law)."""

    temperature_B: jax.Array  # float32
    top_p_B: jax.Array  # float32, 1.0 = off
    top_k_B: jax.Array  # int32, 0 = off

    @classmethod
    def rows(cls, params: SamplingParams | Sequence[SamplingParams], batch: int) -> SamplingArrays:
        """One setting for every row, or one per row (validated by SamplingParams)."""
        ps = [params] * batch if isinstance(params, SamplingParams) else list(params)
        if len(ps) != batch:
            raise ValueError(f"sampling: {len(ps)} per-row settings for a batch of {batch} rows")
        return cls(jnp.asarray([p.temperature for p in ps], jnp.float32), jnp.asarray([p.top_p for p in ps], jnp.float32),
                   jnp.asarray([p.top_k for p in ps], jnp.int32))


def as_sampling(sampling, batch: int) -> SamplingArrays | None:
    """Host: what the compiled loops take. None or all-greedy params -> None (the greedy program);
    SamplingParams (one or per row) -> SamplingArrays; SamplingArrays pass through."""
    if sampling is None or isinstance(sampling, SamplingArrays):
        return sampling
    ps = [sampling] if isinstance(sampling, SamplingParams) else list(sampling)
    if all(p.greedy for p in ps):
        return None
    return SamplingArrays.rows(sampling, batch)


def filtered_logits(logits_BV, sa: SamplingArrays):
    """Logits of the sampling distribution (-inf outside the kept set); rows with temperature 0 get
    their temperature-1 logits (callers one-hot them, see `target_probs`)."""
    t_B = sa.temperature_B
    x = logits_BV.astype(jnp.float32) / jnp.where(t_B > 0, t_B, 1.0)[:, None]
    B, V = x.shape
    k_B, top_p_B = sa.top_k_B, sa.top_p_B

    def filtered(x):
        # One stable sort serves both filters: top-k is a per-row threshold at the k-th largest value
        # (ties kept), top-p the smallest prefix of that order whose mass reaches top_p (>= 1 token).
        order = jnp.argsort(-x, axis=-1, stable=True)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        use_k = ((k_B > 0) & (k_B < V))[:, None]
        kth = jnp.take_along_axis(sorted_x, jnp.clip(k_B - 1, 0, V - 1)[:, None], axis=-1)
        sorted_x = jnp.where(use_k & (sorted_x < kth), -jnp.inf, sorted_x)
        p = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(p, axis=-1) - p
        keep_sorted = (mass_before < top_p_B[:, None]) | (top_p_B >= 1.0)[:, None]
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(B)[:, None], order].set(keep_sorted)
        return jnp.where(keep & ~(use_k & (x < kth)), x, -jnp.inf)

    # The sort only when some row filters: plain temperature sampling stays a softmax.
    return jax.lax.cond(jnp.any(((k_B > 0) & (k_B < V)) | (top_p_B < 1.0)), filtered, lambda x: x, x)


def target_probs(logits_BV, sa: SamplingArrays | SamplingParams | None):
    """The distribution a lossless sampler must reproduce (one-hot argmax for greedy rows)."""
    sa = as_sampling(sa, logits_BV.shape[0])
    one_hot = jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1], dtype=jnp.float32)
    if sa is None:
        return one_hot
    return jnp.where((sa.temperature_B > 0)[:, None], jax.nn.softmax(filtered_logits(logits_BV, sa), axis=-1), one_hot)


def select_tokens(key, logits_BV, sa: SamplingArrays | None):
    argmax_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if sa is None:
        return argmax_B
    drawn_B = jax.random.categorical(key, filtered_logits(logits_BV, sa), axis=-1).astype(jnp.int32)
    return jnp.where(sa.temperature_B > 0, drawn_B, argmax_B)

