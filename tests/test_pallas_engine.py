"""The engine with impl AttentionImpl("pallas") (what `decode.py --attention pallas` selects; interpret
mode on CPU) gives token-identical greedy output to the XLA path on a tiny target, with the kernels — not
the XLA fallback — doing the attention, as read from the lowered programs: prefill kernel (target LM,
vision tower, draft prefill), VATA kernel (the draft's short text-only cache) and split-K tree-verify
kernel (the target's longer video cache)."""

import collections
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
from pallas_kernels import dispatch
from sparrow_jax.decoding import engine as E
from sparrow_jax.decoding.autoregressive import generate as ar_generate
from sparrow_jax.decoding.sampling import as_sampling
from sparrow_jax.decoding.tree import TreeSpec
from sparrow_jax.models import target as tg
from sparrow_jax.models.attention import AttentionImpl

V = _tiny.SMALL_TEXT_VOCAB
MAX_NEW = 10


def video_prompts(cfg):
    """Two rows whose video makes the target prompt bucket 128 while the draft's text-only
    sequence stays in bucket 64: target cache capacity 192, draft cache capacity 128."""
    rng = np.random.default_rng(3)
    return [_tiny.prompt([_tiny.random_text(rng, n, V), _tiny.visual(rng, (4, 8, 8)), _tiny.random_text(rng, 3, V)],
                         cfg) for n in (4, 7)]


def engine_routes(target, draft, p: E.Prepared, cfg: E.EngineConfig) -> dict:
    """The attention routes of the programs a run compiles (the target prefill's vision-tower chunks and
    LM, draft prefill, loop), lowered with `prepare`'s arguments."""
    tgraph, tparams = nnx.split(target)
    dgraph, dparams = nnx.split(draft)
    m_star = tg.default_m_star(target.cfg.num_layers) if draft.cfg.m_star is None else draft.cfg.m_star
    *chunks, pre = tg.lower_prefill(tgraph, tparams, p.batch, capacity=p.pre.cache.capacity, m_star=m_star,
                                    impl=cfg.impl)
    vision = sum((dispatch.routes_in(c) for c in chunks), collections.Counter())
    lay = p.layout
    # with its outputs: else the last layer's attention is dead code (only its K/V reach the cache)
    dpre = E.draft_prefill.lower(dgraph, dparams, p.pre.draft_e_BPD, p.pre.draft_hprev_BPD, p.pre.draft_text_BP,
                                 lay.pos_BP, lay.len_B, lay.next_pos_B, capacity=p.dcache.capacity, impl=cfg.impl,
                                 outputs=True)
    loop = E.speculative_loop.lower(tgraph, tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV,
                                    p.pre.last_hidden_BD, p.pre.rope_delta_B, jax.random.key(0),
                                    as_sampling(None, len(lay.len_B)), None, cfg=cfg)
    return {"vision": vision, "chunks": len(chunks),
            **{name: dispatch.routes_in(x) for name, x in (("prefill", pre), ("draft_prefill", dpre), ("loop", loop))}}


def test_spec_engine_pallas_equals_xla_token_for_token(small_target, random_draft):
    prompts = video_prompts(small_target.cfg)
    tree = TreeSpec.parse("16-3-4")
    ref, _ = E.generate(small_target, random_draft, prompts, E.EngineConfig(tree=tree, max_new_tokens=MAX_NEW))
    # split-K from capacity 160: the target's 192-slot cache -> tree_verify, the draft's 128 -> VATA
    cfg = E.EngineConfig(tree=tree, max_new_tokens=MAX_NEW, impl=AttentionImpl.pallas(split_min_len=160))
    out, res = E.generate(small_target, random_draft, prompts, cfg)
    assert out == ref
    assert all(len(t) == MAX_NEW for t in out)
    assert res.tcache.capacity == 192 and res.dcache.capacity == 128
    routes = engine_routes(small_target, random_draft, E.prepare(small_target, random_draft, prompts, cfg), cfg)
    tl, dl = small_target.cfg.num_layers, random_draft.cfg.num_layers
    # the tower's chunks (one attention per vision block) and the LM
    assert routes["chunks"] >= 1 and routes["vision"] == {"prefill": small_target.cfg.vision.depth * routes["chunks"]}, \
        routes
    assert routes["prefill"] == {"prefill": tl}, routes
    assert routes["draft_prefill"] == {"prefill": dl}, routes
    # a round: target verify over its cache (split-K); draft catch-up + tree steps over its cache (VATA)
    assert routes["loop"]["tree_verify"] == tl and set(routes["loop"]) == {"tree_verify", "vata"}, routes
    xla_cfg = E.EngineConfig(tree=tree, max_new_tokens=MAX_NEW)
    xla_routes = engine_routes(small_target, random_draft, E.prepare(small_target, random_draft, prompts, xla_cfg),
                               xla_cfg)
    assert xla_routes.pop("chunks") == routes["chunks"] and all(r == {} for r in xla_routes.values()), xla_routes


@pytest.mark.slow
def test_autoregressive_pallas_equals_xla(small_target):
    prompts = video_prompts(small_target.cfg)
    ref = ar_generate(small_target, prompts, max_new_tokens=MAX_NEW, eos_ids=())
    out = ar_generate(small_target, prompts, max_new_tokens=MAX_NEW, eos_ids=(), impl=AttentionImpl("pallas"))
    assert out == ref


@pytest.mark.slow
def test_decode_cli_attention_pallas(tmp_path):
    """`decode.py --attention pallas` reaches the kernels and matches `--attention xla`."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import decode  # noqa: PLC0415

    from sparrow_jax.synthetic.video import random_scene, render_frames, write_video  # noqa: PLC0415

    cfg = tmp_path / "tiny_config.json"
    cfg.write_text(json.dumps(_tiny.BASE_HF_CONFIG))
    frames = render_frames(random_scene(np.random.default_rng(0)), num_frames=8, fps=4, height=56, width=56)
    video = write_video(tmp_path / "clip.mp4", frames, fps=4)
    rows = {}
    for impl in ("xla", "pallas"):
        out = tmp_path / f"{impl}.jsonl"
        decode.main(["--config", str(cfg), "--video", str(video), "--prompt", "What moves?",
                     "--max-pixels", str(56 * 56),
                     "--max-new-tokens", "6", "--tree", "10-3-3", "--no-stream", "--attention", impl,
                     "--jsonl", str(out)])
        rows[impl] = [json.loads(x)["tokens"] for x in out.read_text().splitlines()]
    assert rows["pallas"] == rows["xla"] and rows["xla"]
