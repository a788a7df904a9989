"""The speculative engine is lossless (greedy: token-identical to target AR), batched, and one
compiled call."""

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
from sparrow_jax.decoding import engine as E
from sparrow_jax.decoding.autoregressive import generate as ar_generate
from sparrow_jax.decoding.tree import TreeSpec
from sparrow_jax.models import target as tg
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch

MAX_NEW = 16
TREES = ["chain5", "30-4-8", "48-5-10"]
V = _tiny.SMALL_TEXT_VOCAB
MODES = [("text_only", "uniform"), ("ivsb_mid", "uniform"), ("full_visual", "uniform"), ("pruned_visual", "uniform"),
         ("pruned_visual", "attention")]


def make_prompts(cfg, seed, n):
    """Prompts of one padding bucket (<= 64 tokens): text, a video or an image, text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = "image" if i % 3 == 2 else "video"
        grid = (1, 4, 6) if kind == "image" else (int(rng.integers(1, 4)), 4, 4)
        out.append(_tiny.prompt([_tiny.random_text(rng, int(rng.integers(2, 9)), V), _tiny.visual(rng, grid, kind),
                                 _tiny.random_text(rng, int(rng.integers(1, 6)), V)], cfg))
    return out


@pytest.fixture(scope="module")
def prompts(small_target):
    return make_prompts(small_target.cfg, 0, 5)


@pytest.fixture(scope="module")
def ar_reference(small_target, prompts):
    return [ar_generate(small_target, [p], max_new_tokens=MAX_NEW, eos_ids=())[0] for p in prompts]


def assert_lossless(target, prompt, spec, ref):
    """Token-identical, unless the first difference is a genuine near-tie of the target
    (AR top-2 logit margin < 1e-5 at that step) — the check is never loosened otherwise."""
    if spec == ref:
        return
    i = next(j for j, (a, b) in enumerate(zip(spec, ref)) if a != b) if len(spec) == len(ref) else min(len(spec), len(ref))
    q = _tiny.prompt([])
    q.input_ids = np.concatenate([prompt.input_ids, np.asarray(ref[:i], np.int32)])
    q.mm_token_type_ids = np.concatenate([prompt.mm_token_type_ids, np.zeros(i, np.int32)])
    q.visuals = prompt.visuals
    h, _, _ = tg.forward(target, prepare_prefill_batch([q], target.cfg))
    top2 = np.sort(np.asarray(target.logits(h)[0, len(q.input_ids) - 1]))[-2:]
    assert top2[1] - top2[0] < 1e-5, f"speculative {spec} != AR {ref} at step {i} (margin {top2[1] - top2[0]:.2e})"


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("which", ["random", "trained"])
def test_greedy_lossless_all_modes_and_batch_sizes(small_target, random_draft, trained_draft, prompts, ar_reference,
                                                   tree, which):
    draft = random_draft if which == "random" else trained_draft
    cfg = E.EngineConfig(tree=TreeSpec.parse(tree), max_new_tokens=MAX_NEW)
    cases, accepted = 0, []
    for mode, prune_by in MODES:
        for rows in ([0], [1], [2, 3, 4]):
            # Losslessness holds for any draft in any view: run these (view none) drafts in every mode.
            toks, res = E.generate(small_target, draft, [prompts[r] for r in rows], cfg, mode=mode, prune_by=prune_by,
                                   allow_view_mismatch=True)
            for r, t in zip(rows, toks):
                assert_lossless(small_target, prompts[r], t, ar_reference[r])
                cases += 1
            a = np.asarray(res.accepted_BR)
            accepted.extend(a[a > 0].tolist())
    assert cases == 5 * len(MODES)
    tau = float(np.mean(accepted))
    if which == "trained" and tree != "chain5":
        assert tau > 1.5, f"trained draft should be accepted often (tau {tau:.2f}); the test would not exercise trees"


def test_eos_and_max_tokens_per_row(small_target, trained_draft, prompts, ar_reference):
    eos = ar_reference[2][3]
    cfg = E.EngineConfig(tree=TreeSpec.parse("30-4-8"), max_new_tokens=MAX_NEW, eos_ids=(eos,))
    toks, _ = E.generate(small_target, trained_draft, prompts[2:5], cfg)
    for t, ref in zip(toks, ar_reference[2:5]):
        cut = ref.index(eos) + 1 if eos in ref else MAX_NEW
        assert t == ref[:cut]
    short = E.EngineConfig(tree=TreeSpec.parse("30-4-8"), max_new_tokens=5)
    toks, _ = E.generate(small_target, trained_draft, prompts[2:5], short)
    assert toks == [r[:5] for r in ar_reference[2:5]]


def test_whole_generation_is_one_compiled_call_without_recompiles(small_target, trained_draft):
    cfg = E.EngineConfig(tree=TreeSpec.parse("30-4-8"), max_new_tokens=MAX_NEW)
    tgraph, tparams = nnx.split(small_target)
    dgraph, dparams = nnx.split(trained_draft)
    sizes = []
    for i in range(20):
        ps = make_prompts(small_target.cfg, 1000 + i, 3)
        p = E.prepare(small_target, trained_draft, ps, cfg)
        args = (tgraph, tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV, p.pre.last_hidden_BD,
                p.pre.rope_delta_B, jax.random.key(i))
        if i == 0:
            hlo = E.speculative_loop.lower(*args, cfg=cfg).as_text()
            assert hlo.count("stablehlo.while") >= 1
        res = E.speculative_generate(*args, cfg=cfg)  # host capacity check, then the jitted loop
        assert int(res.rounds) > 1  # many rounds ran inside this single call
        sizes.append(E.speculative_loop._cache_size())
    assert sizes[-1] == sizes[0], f"recompiled within one padding bucket: cache sizes {sizes}"


def test_attention_pruning_keeps_text_and_the_most_attended_visual_positions(small_target, random_draft, prompts):
    cfg = E.EngineConfig(tree=TreeSpec.parse("chain5"), max_new_tokens=2)
    p = E.prepare(small_target, random_draft, prompts[2:5], cfg, mode="pruned_visual", keep_fraction=0.5,
                  prune_by="attention", m_star=1, allow_view_mismatch=True)
    batch = p.batch
    m = 1  # the bridge layer m* passed to prepare
    _, kvs, cap = tg.forward(small_target, batch, capture=(m,))
    score = np.asarray(tg.last_token_attention(small_target, batch, cap[m], kvs[m][0], m))
    for b, prompt in enumerate(prompts[2:5]):
        n = int(np.asarray(batch.draft_len_B)[b])
        chosen = np.asarray(p.pre.draft_idx_BP)[b, :n].tolist()
        types = prompt.mm_token_type_ids
        text = np.nonzero(types == 0)[0][1:]  # the draft's items start at t1 (official convention)
        vis = np.nonzero(types != 0)[0]
        want_vis = vis[np.argsort(-score[b, vis], kind="stable")[: int(round(0.5 * len(vis)))]]
        assert chosen == sorted(text.tolist() + want_vis.tolist())


def test_tau_counts_only_emitted_tokens_when_eos_or_max_tokens_cut_a_round(small_target, trained_draft, prompts):
    """accepted_BR records the tokens each round emitted: a round cut by EOS inside its accepted path,
    or by max_new_tokens, counts only what was emitted (sum over rounds = tokens after the first), and
    is flagged in cut_BR so per-depth acceptance leaves its unobserved depth out."""
    from sparrow_jax.decoding.metrics import acceptance_summary

    tree = TreeSpec.parse("30-4-8")
    rows = prompts[2:5]
    _, free = E.generate(small_target, trained_draft, rows, E.EngineConfig(tree=tree, max_new_tokens=MAX_NEW))
    toks, acc = np.asarray(free.tokens_BM), np.asarray(free.accepted_BR)
    # EOS = the first token of a round that emitted >= 3, unseen before it: that round gets cut after 1.
    eos = None
    for b in range(len(rows)):
        starts = 1 + np.concatenate([[0], np.cumsum(acc[b])])
        for r in np.nonzero(acc[b] >= 3)[0]:
            if toks[b, starts[r]] not in toks[b, :starts[r]]:
                eos = int(toks[b, starts[r]])
                break
        if eos is not None:
            break
    assert eos is not None, "no round long enough to cut: the trained draft should accept paths of >= 2 drafts"
    # max_new_tokens = 1 + the tokens of row 0's first round minus one: its first round gets cut.
    M_cut = int(acc[0, 0])
    assert M_cut >= 2, "row 0's first round should emit >= 2 tokens for the max-tokens cut"
    for cfg in (E.EngineConfig(tree=tree, max_new_tokens=MAX_NEW, eos_ids=(eos,)),
                E.EngineConfig(tree=tree, max_new_tokens=M_cut)):
        _, res = E.generate(small_target, trained_draft, rows, cfg)
        a, cut, n = np.asarray(res.accepted_BR), np.asarray(res.cut_BR), np.asarray(res.num_tokens_B)
        assert np.array_equal(a.sum(axis=1), n - 1), "rounds must count exactly the emitted tokens (r0 is prefill's)"
        assert cut.any(), f"{cfg}: no round was cut; the test would not exercise clipping"
        for b in range(len(rows)):
            live = np.nonzero(a[b] > 0)[0]
            assert not cut[b, live[:-1]].any() and not cut[b, a[b] == 0].any(), "only a row's last round is cut"
        m = acceptance_summary(a, tree.max_draft_tokens, cut)
        assert m["tau"] == pytest.approx((n - 1).sum() / m["rounds"])


def test_speculative_generate_refuses_caches_too_small(small_target, random_draft, prompts):
    cfg = E.EngineConfig(tree=TreeSpec.parse("30-4-8"), max_new_tokens=4)
    p = E.prepare(small_target, random_draft, prompts[:2], cfg)
    longest = int(np.max(np.asarray(p.pre.cache.lengths_B)))
    big = E.EngineConfig(tree=cfg.tree, max_new_tokens=p.pre.cache.capacity - longest - cfg.cache_slack + 1)
    (tgraph, tparams), (dgraph, dparams) = nnx.split(small_target), nnx.split(random_draft)
    with pytest.raises(ValueError, match=r"target cache capacity \d+ is too small.*max_new_tokens"):
        E.speculative_generate(tgraph, tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV,
                               p.pre.last_hidden_BD, p.pre.rope_delta_B, jax.random.key(0), cfg=big)
    # the caches were not donated by the refused call: the right-sized run still works
    res = E.speculative_generate(tgraph, tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV,
                                 p.pre.last_hidden_BD, p.pre.rope_delta_B, jax.random.key(0), cfg=cfg)
    assert np.all(np.asarray(res.num_tokens_B) == 4)
