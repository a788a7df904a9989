"""Static EAGLE-2 trees: spec parsing, connectivity of the selected tree, ancestor masks, children,
acceptance rules on hand-built trees, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparrow_jax.decoding.acceptance import accept_greedy, accept_sampling
from sparrow_jax.decoding.metrics import acceptance_summary, speed_summary
from sparrow_jax.decoding.sampling import SamplingParams
from sparrow_jax.decoding.tree import Tree, TreeSpec, ancestor_mask, children_lists, select_tree


def test_tree_spec_parse_and_validation():
    t = TreeSpec.parse("48-5-10")
    assert (t.total_tokens, t.depth, t.top_k) == (48, 5, 10) and t.pool_size == 10 + 4 * 100
    assert TreeSpec.parse("chain5") == TreeSpec(6, 5, 1)
    with pytest.raises(ValueError, match="exceeds"):
        TreeSpec(10, 2, 2)  # pool is only 2 + 4
    with pytest.raises(ValueError, match="TOTAL-DEPTH-TOPK"):
        TreeSpec.parse("48x5")


def _random_pool(rng, spec: TreeSpec, B=2):
    """A pool laid out as the engine fills it: level 1 then k*k children per step of the best frontier."""
    K, D = spec.top_k, spec.depth
    toks, scores, parents, depths = [], [], [], []
    s1 = np.sort(np.log(rng.dirichlet(np.ones(max(K, 8)), size=B)[:, :K]), axis=1)[:, ::-1]
    toks.append(rng.integers(0, 50, (B, K)))
    scores.append(s1)
    parents.append(np.full((B, K), -1))
    depths.append(np.ones((B, K), int))
    front_pool, front_score = np.tile(np.arange(K), (B, 1)), s1
    for s in range(2, D + 1):
        at = K + (s - 2) * K * K
        child = front_score[:, :, None] + np.log(rng.uniform(0.01, 1, (B, K, K)))
        child = child.reshape(B, K * K)
        toks.append(rng.integers(0, 50, (B, K * K)))
        scores.append(child)
        parents.append(np.repeat(front_pool, K, axis=1))
        depths.append(np.full((B, K * K), s))
        pick = np.argsort(-child, axis=1, kind="stable")[:, :K]
        front_pool, front_score = at + pick, np.take_along_axis(child, pick, 1)
    cat = lambda xs: jnp.asarray(np.concatenate(xs, 1))  # noqa: E731
    return cat(toks).astype(jnp.int32), cat(scores).astype(jnp.float32), cat(parents).astype(jnp.int32), \
        cat(depths).astype(jnp.int32)


@pytest.mark.parametrize("spec", [TreeSpec(30, 4, 8), TreeSpec(48, 5, 10), TreeSpec(6, 5, 1), TreeSpec(10, 3, 3)])
def test_selected_tree_is_connected_with_correct_ancestors(spec):
    rng = np.random.default_rng(0)
    tok, score, parent, depth = _random_pool(rng, spec)
    tree = select_tree(jnp.asarray([7, 9]), tok, score, parent, depth, spec)
    par, dep, anc = np.asarray(tree.parent_BN), np.asarray(tree.depth_BN), np.asarray(tree.ancestors_BNN)
    N = spec.total_tokens
    for b in range(2):
        assert np.all(par[b, 1:] < np.arange(1, N)), "parents precede children"
        assert np.all(dep[b, 1:] == dep[b, par[b, 1:]] + 1), "connected: each node's parent is one level up"
        for i in range(N):
            chain, j = {i}, i
            while j != 0:
                j = par[b, j]
                chain.add(j)
            assert set(np.nonzero(anc[b, i])[0]) == chain
        assert dep[b].max() <= spec.depth
    kids = np.asarray(tree.children_BNK)
    for b in range(2):
        for i in range(N):
            listed = [c for c in kids[b, i] if c >= 0]
            assert listed == [c for c in range(1, N) if par[b, c] == i]


def _hand_tree():
    """root(0) -> 1 [tok 5], 2 [tok 6]; 1 -> 3 [tok 7]; 3 -> 4 [tok 8]."""
    parent = jnp.asarray([[0, 0, 0, 1, 3]])
    return Tree(tokens_BN=jnp.asarray([[1, 5, 6, 7, 8]]), parent_BN=parent,
                depth_BN=jnp.asarray([[0, 1, 1, 2, 3]]), ancestors_BNN=ancestor_mask(parent, 3),
                children_BNK=children_lists(parent, 2))


def _logits_with_argmax(argmaxes, V=12):
    return jax.nn.one_hot(jnp.asarray([argmaxes]), V) * 10.0


def test_greedy_acceptance_follows_target_argmax():
    tree = _hand_tree()
    acc = accept_greedy(tree, _logits_with_argmax([5, 7, 0, 8, 3]), depth=3)  # accepts 1, 3, 4; bonus 3
    assert acc.path_BL.tolist() == [[0, 1, 3, 4]] and int(acc.num_accepted_B[0]) == 4 and int(acc.bonus_B[0]) == 3
    acc = accept_greedy(tree, _logits_with_argmax([6, 0, 2, 0, 0]), depth=3)  # takes the second child 2
    assert acc.path_BL.tolist()[0][:2] == [0, 2] and int(acc.num_accepted_B[0]) == 2 and int(acc.bonus_B[0]) == 2
    acc = accept_greedy(tree, _logits_with_argmax([9, 0, 0, 0, 0]), depth=3)  # nothing accepted
    assert int(acc.num_accepted_B[0]) == 1 and int(acc.bonus_B[0]) == 9


def test_sampling_acceptance_of_a_one_token_step_matches_target():
    """One level, two children: the emitted first token is distributed as the target's p."""
    parent = jnp.asarray([[0, 0, 0]])
    tree = Tree(jnp.asarray([[0, 1, 2]]), parent, jnp.asarray([[0, 1, 1]]), ancestor_mask(parent, 1),
                children_lists(parent, 2))
    p = jnp.asarray([0.1, 0.3, 0.2, 0.4])
    logits = jnp.log(jnp.broadcast_to(p, (1, 3, 4)))
    keys = jax.random.split(jax.random.key(0), 20000)
    run = jax.jit(jax.vmap(lambda k: accept_sampling(k, tree, logits, 1, SamplingParams(temperature=1.0))))
    acc = run(keys)
    first = np.where(np.asarray(acc.num_accepted_B)[:, 0] == 2, np.asarray(acc.path_BL)[:, 0, 1],
                     np.asarray(acc.bonus_B)[:, 0])
    freq = np.bincount(first, minlength=4) / len(first)
    np.testing.assert_allclose(freq, np.asarray(p), atol=0.015)


def test_metrics():
    a = np.asarray([[3, 1, 2, 0], [1, 4, 0, 0]])  # path lengths incl. root; 0 = inactive
    m = acceptance_summary(a, depth=3)
    assert m["rounds"] == 5 and m["tau"] == pytest.approx(11 / 5)
    # drafts accepted: 2, 0, 1, 0, 3 -> >=1: 3 of 5; >=2 given >=1: 2 of 3; >=3 given >=2: 1 of 2
    assert m["acceptance_per_depth"] == [0.6, pytest.approx(0.6667, abs=1e-4), 0.5]
    s = speed_summary(ar_prefill_s=1.0, ar_decode_s=4.0, spec_prefill_s=1.0, spec_decode_s=2.0)
    assert s["DSR"] == 2.0 and s["ESR"] == pytest.approx(5 / 3) and s["prefill_share_spec"] == pytest.approx(1 / 3)
