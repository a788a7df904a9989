"""Visual views: what a draft is trained on is exactly what it decodes with.

- the views' item layouts (official sequence convention: the first item is (t1, h0)) are pinned;
- the view is stored in the draft's config.json, and the engine refuses a draft in another view;
- per view, the Trainer's pass-0 output at every slot equals the engine's draft prefill output (1e-5),
  and the engine's draft inputs are the view's definition (token embedding / layer-m* state / the
  target's input embedding of the visual token; h_{t-1});
- Trainer (IVSB on/off x MTP 0/2, and every visual view) -> save_draft -> load_draft -> engine: output
  token-identical to AR and tau clearly above a random draft's in the same view.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from sparrow_jax.decoding import engine as E
from sparrow_jax.decoding.autoregressive import generate as ar_generate
from sparrow_jax.decoding.tree import TreeSpec
from sparrow_jax.io.draft_checkpoint import load_draft, save_draft
from sparrow_jax.models import target as tg
from sparrow_jax.models import views
from sparrow_jax.models.draft import DraftConfig, DraftConfigError, SparrowDraft
from sparrow_jax.models.target import default_m_star
from sparrow_jax.synthetic.samples import synthetic_samples
from sparrow_jax.training.data import Sample, collate, sample_sequence
from sparrow_jax.training.features import FeatureSpec, records_for
from sparrow_jax.training.losses import draft_passes
from sparrow_jax.training.trainer import TrainConfig

MODE = {v: m for m, v in views.MODE_VIEW.items()}
TREE = TreeSpec.parse("chain4")
MAX_NEW = 16


# ------------------------------------------------------------------------------------------ layouts


def test_sequence_layouts_are_pinned():
    is_vis = np.asarray([0, 0, 1, 1, 1, 1, 0, 0], bool)  # t0, <vs>, 4 visual, <ve>, text
    src, is_text, pos, nxt = views.sequence_layout(is_vis, "none")
    assert src.tolist() == [1, 6, 7] and pos.tolist() == [0, 1, 2] and nxt == 3  # t0 has no item
    src, is_text, pos, nxt = views.sequence_layout(is_vis, "ivsb_mid")
    assert src.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert pos.tolist() == [0, 0, 0, 0, 0, 1, 2] and nxt == 3  # visual items at <vision_start>'s position
    src, is_text, pos, nxt = views.sequence_layout(is_vis, "msd")
    assert src.tolist() == [1, 2, 3, 4, 5, 6, 7] and pos.tolist() == list(range(7)) and nxt == 7
    assert is_text.tolist() == [True, False, False, False, False, True, True]
    kept = views.kept_visual(4, 0.5)
    assert kept.tolist() == [0, 3]  # evenly spaced
    src, is_text, pos, nxt = views.sequence_layout(is_vis, "pruned", kept)
    assert src.tolist() == [1, 2, 5, 6, 7] and pos.tolist() == list(range(5)) and nxt == 5
    assert views.kept_visual(4, 0.5, score_M=[0.1, 0.4, 0.4, 0.2]).tolist() == [1, 2]  # most attended
    assert views.num_kept(100, views.DEFAULT_KEEP_FRACTION) == 10 and views.num_kept(3, 0.1) == 1


def test_training_views_and_feature_specs():
    assert views.training_view("none", True) == "ivsb_mid"  # Sparrow: IVSB slots in training only
    assert views.training_view("none", False) == "none"  # plain EAGLE
    assert views.training_view("msd", True) == views.training_view("msd", False) == "msd"  # ivsb irrelevant
    with pytest.raises(ValueError, match="ivsb_mid.*ivsb=true"):
        TrainConfig(visual_view="ivsb_mid", ivsb=False)
    with pytest.raises(ValueError, match="unknown visual view 'full'"):
        TrainConfig(visual_view="full")
    assert TrainConfig(visual_view="msd").feature_spec(2) == FeatureSpec(2, "embed")
    assert TrainConfig(visual_view="pruned", visual_prune_by="attention").feature_spec(2) == \
        FeatureSpec(2, "embed", scores=True)
    assert TrainConfig(ivsb=False).feature_spec(2).visual is None
    # Features extracted for one view are refused for another, with the reason.
    mid = FeatureSpec(2, "mid").meta()
    assert FeatureSpec(2, "embed").mismatch(mid) == "visual states 'mid', not 'embed'"
    assert FeatureSpec(1, "mid").mismatch(mid) == "m* 2, not 1"
    assert FeatureSpec(2, None).mismatch(mid) is None


# ------------------------------------------------------------------------------- stored and checked


def test_view_is_stored_in_config_json_and_checked_by_the_engine(small_target, tmp_path):
    cfg = DraftConfig.for_target(small_target.cfg, visual_view="pruned", m_star=1, visual_keep_fraction=0.2,
                                 visual_prune_by="attention")
    save_draft(SparrowDraft(cfg, rngs=nnx.Rngs(0)), tmp_path / "d")
    loaded = load_draft(tmp_path / "d", target_cfg=small_target.cfg)
    assert loaded.cfg == cfg
    assert DraftConfig.from_dict({k: v for k, v in cfg.to_dict().items() if not k.startswith("visual")}).visual_view \
        == "none"  # configs written before views: text-only drafts
    with pytest.raises(DraftConfigError, match="unknown visual view 'msd2'"):
        DraftConfig.for_target(small_target.cfg, visual_view="msd2")
    with pytest.raises(DraftConfigError, match="m_star 3 is not inside"):
        DraftConfig.for_target(small_target.cfg, m_star=3).check_fits(small_target.cfg)
    ecfg = E.EngineConfig(tree=TREE, max_new_tokens=2)
    with pytest.raises(views.ViewMismatchError, match=r"trained for visual view 'pruned'.*mode 'text_only' runs view "
                       r"'none'.*Use mode 'pruned_visual'.*allow_view_mismatch=True"):
        E.prepare(small_target, loaded, [], ecfg, mode="text_only")
    with pytest.raises(ValueError, match="visual mode 'full'"):
        E.prepare(small_target, loaded, [], ecfg, mode="full")


def test_prefill_computes_only_what_the_view_reads(small_target):
    prompts = [s.prompt for s in synthetic_samples(small_target.cfg, 2, seed=5, text_vocab=_tiny.SMALL_TEXT_VOCAB)]
    ecfg = E.EngineConfig(tree=TREE, max_new_tokens=2)
    p = E.prepare(small_target, SparrowDraft(DraftConfig.for_target(small_target.cfg), rngs=nnx.Rngs(0)), prompts, ecfg)
    assert p.pre.text_hidden_BLD is None and p.pre.vis_hidden_mid_BMD is None  # text_only: nothing all-position
    assert p.batch.draft_visual_state is None and not p.batch.draft_by_attention  # so no layer-m* capture
    assert p.pre.draft_e_BPD.shape[1] == tg.bucket(max(int((np.asarray(q.mm_token_type_ids) == 0).sum()) - 1
                                                       for q in prompts))


# ------------------------------------------------------------------------------ trainer == engine


PARITY = [("none", dict(ivsb=False)), ("ivsb_mid", {}), ("msd", {}), ("pruned", dict(visual_keep_fraction=0.3)),
          ("pruned", dict(visual_keep_fraction=0.3, visual_prune_by="attention"))]


@pytest.mark.parametrize("view,kw", PARITY, ids=["none", "ivsb_mid", "msd", "pruned", "pruned-attention"])
def test_trainer_pass0_slots_equal_engine_draft_prefill(small_target, view, kw):
    """The Trainer's slot sequence (its collate + loss pass 0, MTP off) and the engine's draft prefill
    on the same sequences (each sample's prompt + response as the prompt) give the same output at every
    item, and the engine's draft inputs are the view's definition."""
    tcfg = TrainConfig(visual_view=view, mtp_steps=0, max_text=32, max_visual=16, **kw)
    m_star = default_m_star(small_target.cfg.num_layers)
    by_attention = kw.get("visual_prune_by") == "attention"
    samples = synthetic_samples(small_target.cfg, 3, seed=3, text_vocab=_tiny.SMALL_TEXT_VOCAB)
    if by_attention:  # the engine attends from its prompt's last token: make that the sample's last one
        samples = [Sample(s.prompt, ()) for s in samples]
    records = records_for(small_target, samples, spec=tcfg.feature_spec(m_star))
    batch = jax.tree.map(jnp.asarray, collate(records, L=tcfg.max_text, M=tcfg.max_visual, spec=tcfg.slots))
    draft = SparrowDraft(DraftConfig.for_target(small_target.cfg, visual_view=view, m_star=m_star,
                                                visual_keep_fraction=tcfg.visual_keep_fraction,
                                                visual_prune_by=tcfg.visual_prune_by), rngs=nnx.Rngs(4))
    y_BSD = draft_passes(draft, small_target.embed, batch, tcfg.loss, all_slots=True)[0]

    seqs = [sample_sequence(s)[0] for s in samples]
    p = E.prepare(small_target, draft, seqs, E.EngineConfig(tree=TREE, max_new_tokens=2), mode=MODE[view],
                  draft_outputs=True)
    h_BTD, _, cap = tg.forward(small_target, p.batch, capture=(0, m_star))
    for b, seq in enumerate(seqs):
        n = int(p.layout.len_B[b])
        assert int(batch.slot_len_B[b]) == n, "trainer and engine disagree on the number of items"
        np.testing.assert_allclose(np.asarray(y_BSD[b, :n]), np.asarray(p.draft_out_BPD[b, :n]), atol=1e-5)
        # The engine's inputs are the view's definition.
        idx = np.asarray(p.pre.draft_idx_BP[b, :n])
        is_vis = np.asarray(seq.mm_token_type_ids)[idx] != 0
        assert idx[0] >= 1 and np.array_equal(np.asarray(p.pre.draft_text_BP[b, :n]), ~is_vis)
        state = {"none": None, "ivsb_mid": m_star, "msd": 0, "pruned": 0}[view]
        want_e = np.where(is_vis[:, None], np.asarray(cap[state if state is not None else 0][b, idx]),
                          np.asarray(cap[0][b, idx]))
        np.testing.assert_allclose(np.asarray(p.pre.draft_e_BPD[b, :n]), want_e, atol=1e-5)
        np.testing.assert_allclose(np.asarray(p.pre.draft_hprev_BPD[b, :n]), np.asarray(h_BTD[b, idx - 1]), atol=1e-5)
        if view == "none":
            assert not is_vis.any()
        if view in ("ivsb_mid", "msd"):
            assert is_vis.sum() == (np.asarray(seq.mm_token_type_ids) != 0).sum()
        if view == "pruned":
            assert is_vis.sum() == views.num_kept(int((np.asarray(seq.mm_token_type_ids) != 0).sum()), 0.3)


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def heldout(small_target):
    prompts = [s.prompt for s in synthetic_samples(small_target.cfg, 4, seed=99, text_vocab=_tiny.SMALL_TEXT_VOCAB)]
    return prompts, ar_generate(small_target, prompts, max_new_tokens=MAX_NEW, eos_ids=())


def _tau(res):
    a = np.asarray(res.accepted_BR)
    return float(a[a > 0].mean())


# Sparrow (none + IVSB + MTP 2) is the conftest default; plain EAGLE = none, no IVSB, no MTP.
E2E = {
    "eagle": dict(ivsb=False, mtp_steps=0),
    "none-mtp2": dict(ivsb=False),
    "none-ivsb": dict(mtp_steps=0),
    "sparrow": {},
    "ivsb_mid": dict(visual_view="ivsb_mid"),
    "msd": dict(visual_view="msd", mtp_steps=0, curriculum_text_steps=20, curriculum_ramp_steps=60),  # MSD's curriculum
    "pruned": dict(visual_view="pruned", mtp_steps=0, visual_keep_fraction=0.3),
}
TAU_MARGIN = 0.4  # stated: a trained draft commits >= 0.4 more tokens per round than a random one


@pytest.mark.parametrize("case", list(E2E))
def test_trainer_draft_exports_loads_and_decodes_in_its_view(small_target, train_draft, heldout, tmp_path, case):
    prompts, ref = heldout
    save_draft(train_draft(**E2E[case]), tmp_path / "draft")
    draft = load_draft(tmp_path / "draft", target_cfg=small_target.cfg)
    view = draft.cfg.visual_view
    assert view == E2E[case].get("visual_view", "none")
    ecfg = E.EngineConfig(tree=TREE, max_new_tokens=MAX_NEW)
    toks, res = E.generate(small_target, draft, prompts, ecfg, mode=MODE[view])
    assert toks == ref, f"{case}: speculative output differs from AR"
    random = SparrowDraft(dataclasses.replace(draft.cfg), rngs=nnx.Rngs(123))
    rtoks, rres = E.generate(small_target, random, prompts, ecfg, mode=MODE[view])
    assert rtoks == ref
    assert _tau(res) >= _tau(rres) + TAU_MARGIN, f"{case}: tau {_tau(res):.2f} vs random {_tau(rres):.2f}"
