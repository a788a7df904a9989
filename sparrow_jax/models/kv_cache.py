"""KV cache as an explicit pytree: one [B, S, K, E] array per layer (no stacked [L, ...] slicing
per step; SPEC §5) and the committed length of each row.

Padding scheme: rows are right-padded. Row b's committed entries live at [0, lengths_B[b]); slots
after that hold stale data and are never visible (attention masks keys j >= length). New entries are
written at each row's own length, so rows advance independently.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, K, E]
    v: tuple[jax.Array, ...]
    lengths_B: jax.Array  # int32 committed length per row
    # RoPE position of slot i is i + pos_offset_B (None: 0). A draft whose positions are not its slot
    # indices (the ivsb_mid view: visual items share a text item's position) decodes from an offset.
    pos_offset_B: jax.Array | None = None

    def next_position(self):
        """[B] position of the next entry of each row."""
        return self.lengths_B if self.pos_offset_B is None else self.lengths_B + self.pos_offset_B

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @staticmethod
    def empty(num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype):
        z = lambda: jnp.zeros((batch, capacity, num_kv_heads, head_dim), dtype)  # noqa: E731
        return KVCache(tuple(z() for _ in range(num_layers)), tuple(z() for _ in range(num_layers)),
                       jnp.zeros((batch,), jnp.int32))


def write_rows(cache_BSKE, new_BNKE, start_B):
    """Write each row's new entries at its own start (dynamic_update_slice per row). The caller
    guarantees start + N <= capacity (dynamic_update_slice would clamp, i.e. shift, otherwise)."""
    def one(c_SKE, n_NKE, s):
        return jax.lax.dynamic_update_slice(c_SKE, n_NKE.astype(c_SKE.dtype), (s, 0, 0))
    return jax.vmap(one)(cache_BSKE, new_BNKE, start_B)


def commit(cache: KVCache, block_kv, accept_idx_BN, counts_B) -> KVCache:
    """Make the accepted block entries contiguous after each row's committed length.

    block_kv: per-layer (k [B, N, K, E], v [B, N, K, E]) from `verify`. accept_idx_BN: block indices
    of the accepted path in order (entries past counts_B[b] are ignored; they land in invalid slots).
    """
    take = lambda x_BNKE: jnp.take_along_axis(x_BNKE, accept_idx_BN[:, :, None, None], axis=1)  # noqa: E731
    ks = tuple(write_rows(c, take(k), cache.lengths_B) for c, (k, _) in zip(cache.k, block_kv))
    vs = tuple(write_rows(c, take(v), cache.lengths_B) for c, (_, v) in zip(cache.v, block_kv))
    return dataclasses.replace(cache, k=ks, v=vs, lengths_B=cache.lengths_B + counts_B.astype(jnp.int32))
