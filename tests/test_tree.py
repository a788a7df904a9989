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
    """EAGLE-2 notation: depth = expansion steps after the first (cnets1.py `topK_genrate`: level 1, then
    `for i in range(depth)` steps of k*k candidates), total_tokens counts the root."""
    t = TreeSpec.parse("48-5-10")
    assert (t.total_tokens, t.depth, t.top_k) == (48, 5, 10)
    assert t.max_draft_tokens == 6 and t.pool_size == 10 + 5 * 100 and t.fed_nodes == 5 * 10
    t = TreeSpec.parse("30-4-8")
    assert t.max_draft_tokens == 5 and t.pool_size == 8 + 4 * 64 and t.fed_nodes == 4 * 8
    chain = TreeSpec.parse("chain5")  # 5 draft tokens: root + 5 nodes, 4 expansions after the first
    assert chain == TreeSpec(6, 4, 1) and chain.max_draft_tokens == 5 and chain.pool_size == 5
    assert TreeSpec.parse("chain1") == TreeSpec(2, 0, 1)  # one draft token, no expansion step
    with pytest.raises(ValueError, match="exceeds"):
        TreeSpec(10, 1, 2)  # pool is only 2 + 4
    with pytest.raises(ValueError, match="TOTAL-DEPTH-TOPK"):
        TreeSpec.parse("48x5")
    with pytest.raises(ValueError, match="chainN"):
        TreeSpec.parse("chainx")
    with pytest.raises(ValueError, match="at least 1"):
        TreeSpec.parse("chain0")


def _random_pool(rng, spec: TreeSpec, B=2):
    """A pool laid out as the engine fills it: level 1 then k*k children per step of the best frontier."""
    K, D = spec.top_k, spec.max_draft_tokens
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


@pytest.mark.parametrize("spec", [TreeSpec(30, 4, 8), TreeSpec(48, 5, 10), TreeSpec.parse("chain5"), TreeSpec(10, 3, 3)])
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
        assert dep[b].max() <= spec.max_draft_tokens
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
    a = np.asarray([[3, 1, 2, 0], [1, 4, 0, 0]])  # tokens emitted per round; 0 = inactive
    m = acceptance_summary(a, max_draft_tokens=3)
    assert m["rounds"] == 5 and m["tau"] == pytest.approx(11 / 5)
    # drafts accepted: 2, 0, 1, 0, 3 -> >=1: 3 of 5; >=2 given >=1: 2 of 3; >=3 given >=2: 1 of 2
    assert m["acceptance_per_depth"] == [0.6, pytest.approx(0.6667, abs=1e-4), 0.5]
    # Row 1's last round was cut (EOS / max tokens) after 2 emitted tokens, both accepted drafts: tau
    # counts those 2, depths 1 and 2 count as accepted, depth 3 is unobserved for that round.
    cut = np.zeros(a.shape, bool)
    cut[1, 1] = True
    a[1, 1] = 2
    m = acceptance_summary(a, max_draft_tokens=3, cut_BR=cut)
    assert m["tau"] == pytest.approx(9 / 5) and m["cut_rounds"] == 1
    # drafts: 2, 0, 1, 0, 2 (cut) -> >=1: 3 of 5; >=2 given >=1: 2 of 3; depth 3: round 0 rejected it,
    # the cut round is left out -> 0 of 1
    assert m["acceptance_per_depth"] == [0.6, pytest.approx(0.6667, abs=1e-4), 0.0]
    assert m["accepted_histogram"] == [2, 1, 2, 0]
    s = speed_summary(ar_prefill_s=1.0, ar_decode_s=4.0, spec_prefill_s=1.0, spec_decode_s=2.0)
    assert s["DSR"] == 2.0 and s["ESR"] == pytest.approx(5 / 3) and s["prefill_share_spec"] == pytest.approx(1 / 3)


class _PeakedTarget:
    """Stand-in head: every node's distribution puts ~all mass on one token, so the chain of best children
    keeps a cumulative log-prob ~0 and outranks every other candidate — the selected tree then reaches
    the full depth the notation allows."""

    V = 32

    def __init__(self):
        noise = np.random.default_rng(0).normal(0, 1, self.V)
        noise[3] = 40.0
        self.logits_V = jnp.asarray(noise, jnp.float32)

    def logits(self, h):
        return jnp.broadcast_to(self.logits_V, h.shape[:-1] + (self.V,))

    def embed(self, tok):
        return jnp.zeros(tok.shape + (4,), jnp.float32)


class _CountingDraft:
    """Stand-in draft (echoes its hidden input) that counts the frontier nodes it is fed."""

    cfg = type("Cfg", (), dict(num_layers=1, num_key_value_heads=1, head_dim=2))

    def __init__(self):
        self.fed = []

    def __call__(self, e_BKD, h_BKD, pos, mask, *, caches, impl, block_prefix):
        B, K, _ = h_BKD.shape
        self.fed.append(K)
        return h_BKD + e_BKD, [(jnp.zeros((B, K, 1, 2)), jnp.zeros((B, K, 1, 2)))]


@pytest.mark.parametrize("text, deepest", [("48-5-10", 6), ("30-4-8", 5), ("chain5", 5), ("chain1", 1)])
def test_engine_tree_depth_follows_eagle2_notation(text, deepest):
    """engine.build_tree runs `depth` expansion steps of top_k fed nodes after the first level, so the
    paper's 48-5-10 yields paths of up to 6 draft tokens; the tree has total_tokens nodes, root included."""
    from sparrow_jax.decoding.engine import build_tree
    from sparrow_jax.models.kv_cache import KVCache

    spec = TreeSpec.parse(text)
    B = 2
    dcache = KVCache.empty(1, B, 8, 1, 2, jnp.float32)
    dcache = KVCache(dcache.k, dcache.v, jnp.asarray([3, 5], jnp.int32))
    draft = _CountingDraft()
    tree = build_tree(_PeakedTarget(), draft, dcache, jnp.ones((B, 4)), jnp.asarray([1, 2]), spec, "xla")
    assert len(draft.fed) == spec.depth and sum(draft.fed) == spec.fed_nodes
    assert tree.tokens_BN.shape == (B, spec.total_tokens)
    dep = np.asarray(tree.depth_BN)
    assert np.all(dep.max(axis=1) == deepest) and spec.max_draft_tokens == deepest
    par = np.asarray(tree.parent_BN)
    assert np.all(dep[:, 1:] == np.take_along_axis(dep, par[:, 1:], 1) + 1), "connected tree"
