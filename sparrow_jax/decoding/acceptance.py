"""Verification outcome of a draft tree: the accepted root-to-node path and the bonus token.

Both rules walk down from the root, one level per iteration (depth + 1 levels at most):
- greedy: a child is accepted iff its token is the target's argmax at the current node;
- sampling (EAGLE-2 / SpecInfer rule for deterministic proposals): with p the target distribution at
  the current node (temperature -> top-k -> top-p), try the children in order; accept child x with
  probability p(x) / sum(p); on rejection set p(x) = 0 (the residual). If no child is accepted, the
  bonus token is drawn from the residual and the walk stops. Exactly lossless: the emitted token at
  each step is distributed as p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparrow_jax.decoding.sampling import SamplingArrays, target_probs
from sparrow_jax.decoding.tree import Tree


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Acceptance:
    path_BL: jax.Array  # tree indices of the accepted path, root first, L = depth + 1 (padded with 0)
    num_accepted_B: jax.Array  # path length incl. root = tokens committed this round (bonus excluded)
    bonus_B: jax.Array  # the target's own next token after the path


def _walk(tree: Tree, levels: int, try_children):
    """Shared descent. try_children(state, cur_B) -> (next_B or -1, state); state carries the
    residual distribution (sampling) or nothing (greedy)."""
    B, N = tree.tokens_BN.shape
    path = jnp.zeros((B, levels), jnp.int32)
    cur = jnp.zeros((B,), jnp.int32)
    alive = jnp.ones((B,), bool)
    n = jnp.ones((B,), jnp.int32)

    def level(d, carry):
        path, cur, alive, n, state = carry
        nxt, state = try_children(state, cur, alive)
        step = alive & (nxt >= 0)
        cur = jnp.where(step, nxt, cur)
        path = path.at[:, d + 1].set(jnp.where(step, nxt, path[:, d + 1]))
        return path, cur, step, n + step, state

    return level, (path, cur, alive, n)


def accept_greedy(tree: Tree, logits_BNV, depth: int) -> Acceptance:
    argmax_BN = jnp.argmax(logits_BNV, axis=-1).astype(jnp.int32)

    def try_children(state, cur, alive):
        want = jnp.take_along_axis(argmax_BN, cur[:, None], 1)[:, 0]
        kids = jnp.take_along_axis(tree.children_BNK, cur[:, None, None], 1)[:, 0]  # [B, K]
        ktok = jnp.take_along_axis(tree.tokens_BN, jnp.maximum(kids, 0), 1)
        hit = (kids >= 0) & (ktok == want[:, None])
        first = jnp.argmax(hit, axis=-1)
        nxt = jnp.where(hit.any(-1), jnp.take_along_axis(kids, first[:, None], 1)[:, 0], -1)
        return nxt, state

    level, (path, cur, alive, n) = _walk(tree, depth + 1, try_children)
    path, cur, _, n, _ = jax.lax.fori_loop(0, depth, level, (path, cur, alive, n, ()))
    bonus = jnp.take_along_axis(argmax_BN, cur[:, None], 1)[:, 0]
    return Acceptance(path, n, bonus)


def accept_sampling(key, tree: Tree, logits_BNV, depth: int, sp: SamplingArrays) -> Acceptance:
    B, N, V = logits_BNV.shape
    K = tree.children_BNK.shape[-1]

    def probs_at(cur):
        return target_probs(jnp.take_along_axis(logits_BNV, cur[:, None, None], 1)[:, 0], sp)

    def try_children(state, cur, alive):
        key, p_BV = state
        kids = jnp.take_along_axis(tree.children_BNK, cur[:, None, None], 1)[:, 0]
        key, sub = jax.random.split(key)
        u_BK = jax.random.uniform(sub, (B, K))

        def child(j, c):
            p, nxt = c
            kid = kids[:, j]
            x = jnp.take_along_axis(tree.tokens_BN, jnp.maximum(kid, 0)[:, None], 1)[:, 0]
            px = jnp.take_along_axis(p, x[:, None], 1)[:, 0]
            trying = alive & (kid >= 0) & (nxt < 0)
            acc = trying & (u_BK[:, j] * jnp.sum(p, -1) < px)
            rej = trying & ~acc
            p = jnp.where(rej[:, None] & (jnp.arange(V)[None] == x[:, None]), 0.0, p)
            return p, jnp.where(acc, kid, nxt)

        p_BV, nxt = jax.lax.fori_loop(0, K, child, (p_BV, jnp.full((B,), -1, jnp.int32)))
        # Keep the residual of rows that stop here; rows that moved start fresh at the child.
        p_BV = jnp.where((nxt >= 0)[:, None], probs_at(jnp.maximum(nxt, 0)), p_BV)
        return nxt, (key, p_BV)

    key, k_bonus = jax.random.split(key)
    level, (path, cur, alive, n) = _walk(tree, depth + 1, try_children)
    init = (path, cur, alive, n, (key, probs_at(jnp.zeros((B,), jnp.int32))))
    path, cur, _, n, (_, residual) = jax.lax.fori_loop(0, depth, level, init)
    bonus = jax.random.categorical(k_bonus, jnp.log(residual), axis=-1).astype(jnp.int32)
    return Acceptance(path, n, bonus)
