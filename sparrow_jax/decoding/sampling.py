"""Token selection shared by AR generation and speculative acceptance: one definition of the
target distribution (temperature -> top-k -> top-p, transformers' warper order)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax). top_k 0 and top_p 1.0 disable those filters."""

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


def filtered_logits(logits_BV, sp: SamplingParams):
    """Logits of the sampling distribution (-inf outside the kept set). Not for greedy."""
    x = logits_BV.astype(jnp.float32) / sp.temperature
    V = x.shape[-1]
    if 0 < sp.top_k < V:
        kth = jax.lax.top_k(x, sp.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sp.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        p = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(p, axis=-1) - p
        keep_sorted = mass_before < sp.top_p  # smallest prefix whose mass reaches top_p (>= 1 token)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, -jnp.inf)
    return x


def target_probs(logits_BV, sp: SamplingParams):
    """The distribution a lossless sampler must reproduce (one-hot argmax when greedy)."""
    if sp.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logits_BV, sp), axis=-1)


def select_tokens(key, logits_BV, sp: SamplingParams):
    if sp.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_BV, sp), axis=-1).astype(jnp.int32)
