"""EAGLE-2 dynamic draft trees with static shapes.

Notation = EAGLE-2's and the released Sparrow code's `total_token`/`depth`/`top_k` (SPEC §2):
`total_tokens` counts the verified nodes, root included; `depth` counts the expansion steps after the
first one, so a root-to-leaf path holds up to depth + 1 draft tokens. Step 1 adds the top-k children
of the root to the pool; each of the `depth` further steps feeds the k best frontier nodes (by
cumulative log-prob) to the draft and adds their k*k children, so the pool has k + depth*k*k entries.
The verified tree is the root plus the `total_tokens - 1` best pool entries, ordered by pool index,
which puts every parent before its children. Scores never increase along a path and ties keep the
lower (earlier) index, so the selection is a connected tree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    total_tokens: int  # nodes verified, root included (EAGLE-2 `total_token`)
    depth: int  # expansion steps after the first (EAGLE-2 `depth`): paths hold up to depth + 1 drafts
    top_k: int

    def __post_init__(self):
        if self.depth < 0 or self.top_k < 1 or self.total_tokens < 2:
            raise ValueError(f"tree {self}: need depth >= 0, top_k >= 1, total_tokens >= 2")
        if self.total_tokens - 1 > self.pool_size:
            raise ValueError(f"tree {self}: total_tokens - 1 = {self.total_tokens - 1} exceeds the "
                             f"{self.pool_size} candidates this depth/top_k yields (top_k + depth * top_k^2)")

    @property
    def max_draft_tokens(self) -> int:
        """Draft tokens on the longest root-to-leaf path (= tree levels below the root)."""
        return self.depth + 1

    @property
    def pool_size(self) -> int:
        return self.top_k + self.depth * self.top_k**2

    @property
    def fed_nodes(self) -> int:
        """Tree nodes the draft processes while expanding: k frontier nodes in each of the depth steps."""
        return self.depth * self.top_k

    @classmethod
    def parse(cls, text: str) -> "TreeSpec":
        """'48-5-10' = TOTAL-DEPTH-TOPK in EAGLE-2's notation (48 nodes with the root, paths of up to 6
        drafts, top-10); 'chainN' = a chain of N draft tokens (top_k 1, depth N - 1, N + 1 nodes)."""
        if text.startswith("chain"):
            try:
                n = int(text[5:])
            except ValueError:
                raise ValueError(f"tree {text!r}: expected chainN with N draft tokens, like chain5") from None
            if n < 1:
                raise ValueError(f"tree {text!r}: a chain needs at least 1 draft token")
            return cls(n + 1, n - 1, 1)
        try:
            n, d, k = (int(x) for x in text.split("-"))
        except ValueError:
            raise ValueError(f"tree {text!r}: expected TOTAL-DEPTH-TOPK like 48-5-10, or chainN") from None
        return cls(n, d, k)

    def __str__(self):
        return f"{self.total_tokens}-{self.depth}-{self.top_k}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tree:
    tokens_BN: jax.Array  # node 0 = root (last committed token)
    parent_BN: jax.Array  # tree index of the parent (root: 0)
    depth_BN: jax.Array  # root 0
    ancestors_BNN: jax.Array  # [b, i, j] = j is i or an ancestor of i
    children_BNK: jax.Array  # child tree indices of each node in order, -1 padded


def select_tree(root_B, pool_tok_BP, pool_score_BP, pool_parent_BP, pool_depth_BP, spec: TreeSpec) -> Tree:
    """Root + best `total_tokens - 1` pool candidates as a tree (pool_parent: pool index, -1 = root)."""
    B, P = pool_tok_BP.shape
    n = spec.total_tokens - 1
    _, sel = jax.lax.top_k(pool_score_BP, n)
    sel = jnp.sort(sel, axis=-1)  # pool order: parents first
    take = lambda x: jnp.take_along_axis(x, sel, axis=-1)  # noqa: E731
    pool_to_tree = jnp.full((B, P), -1, jnp.int32).at[jnp.arange(B)[:, None], sel].set(
        jnp.arange(1, n + 1, dtype=jnp.int32)[None])
    ppar = take(pool_parent_BP)
    par = jnp.where(ppar < 0, 0, jnp.take_along_axis(pool_to_tree, jnp.maximum(ppar, 0), axis=-1))
    tokens = jnp.concatenate([root_B[:, None], take(pool_tok_BP)], axis=1).astype(jnp.int32)
    parent = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), par], axis=1)
    depth = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), take(pool_depth_BP)], axis=1)
    return Tree(tokens, parent, depth, ancestor_mask(parent, spec.max_draft_tokens), children_lists(parent, spec.top_k))


def ancestor_mask(parent_BN, max_depth: int):
    """anc[i] = {i} ∪ anc[parent(i)], by pointer jumping (max_depth rounds suffice)."""
    B, N = parent_BN.shape
    anc = jnp.broadcast_to(jnp.eye(N, dtype=bool), (B, N, N))
    up = parent_BN
    for _ in range(max_depth):
        anc = anc | (up[:, :, None] == jnp.arange(N)[None, None])
        up = jnp.take_along_axis(parent_BN, up, axis=1)
    return anc


def children_lists(parent_BN, max_children: int):
    """children[b, i, r] = tree index of the r-th child (in index order) of node i, or -1."""
    B, N = parent_BN.shape
    idx = jnp.arange(N)
    is_child = idx[None, :] > 0  # root is nobody's child
    same = (parent_BN[:, :, None] == parent_BN[:, None, :]) & (idx[None, None, :] < idx[None, :, None])
    rank = jnp.sum(same & is_child[:, None, :], axis=-1)  # earlier siblings
    out = jnp.full((B, N, max_children), -1, jnp.int32)
    # Non-children scatter out of range and are dropped.
    p = jnp.where(is_child, parent_BN, N)
    return out.at[jnp.arange(B)[:, None], p, jnp.minimum(rank, max_children - 1)].set(
        jnp.broadcast_to(idx[None], (B, N)).astype(jnp.int32), mode="drop")
