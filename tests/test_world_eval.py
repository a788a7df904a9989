"""The "reads the video" evaluation (synthetic/evaluate.py, bench/target_reads_video.py): questions that
continue one prefilled video get the logits and greedy answers of the full prompt; the items, controls
and summaries are what the benchmark reports; the benchmark resumes from its per-video results."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparrow_jax.decoding.autoregressive import cache_capacity, generate
from sparrow_jax.io.text import load_codec
from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
from sparrow_jax.synthetic import evaluate as EV
from sparrow_jax.synthetic import world as W
from sparrow_jax.synthetic.tokenizer import SHIPPED_DIR

ROOT = Path(__file__).resolve().parent.parent
SCENES = [W.make_scene(s, 8) for s in W.split_seeds("test", 2)]


@pytest.fixture(scope="module")
def asker():
    """A random target of the shipped architecture (configs/tiny.json) with the shipped tokenizer."""
    cfg = registry.config_from_dict(*registry.read_config_dict(ROOT / "configs" / "tiny.json"))
    model = registry.build_target(cfg, rngs=nnx.Rngs(3))
    return EV.Asker(model, load_codec(SHIPPED_DIR, cfg.text.vocab_size))


def test_extend_gives_the_full_prompts_logits(asker):
    """Prefill (prefix + video) then `extend` by the question == prefill of the whole chat prompt."""
    visuals = [EV.condition_visual(s, c) for s, c in zip(SCENES, ("real", "shuffled"))]
    questions = [EV.scene_items(SCENES[0])[0].question,  # of different lengths
                 max((q.question for q in EV.scene_items(SCENES[1])), key=len)]
    cfg = asker.model.cfg
    full = registry.prepare_batch_for(cfg)([W.chat_prompt(asker.codec, v, q, asker.ids)
                                            for v, q in zip(visuals, questions)], cfg)
    ref = tg.prefill(asker.graphdef, asker.params, full, capacity=cache_capacity(full.input_ids_BT.shape[1], 4),
                     m_star=1)
    from sparrow_jax.io.text import QWEN_USER_PREFIX
    from sparrow_jax.io.vision_inputs import build_multimodal_prompt

    prefix = registry.prepare_batch_for(cfg)([build_multimodal_prompt([asker.codec.encode(QWEN_USER_PREFIX), v],
                                                                      asker.ids) for v in visuals], cfg)
    pre = tg.prefill(asker.graphdef, asker.params, prefix, capacity=full.input_ids_BT.shape[1] + 64, m_star=1)
    q_ids = [asker.question_ids(q) for q in questions]
    assert len(set(map(len, q_ids))) == 2
    toks = np.zeros((2, EV.QUESTION_BUCKET), np.int32)
    for b, t in enumerate(q_ids):
        toks[b, :len(t)] = t
    cache, logits_BV = EV.extend(asker.graphdef, asker.params, pre.cache, jnp.asarray(toks),
                                 jnp.asarray([len(t) for t in q_ids], jnp.int32), pre.rope_delta_B)
    np.testing.assert_allclose(np.asarray(logits_BV), np.asarray(ref.last_logits_BV), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), np.asarray(full.lengths_B))
    assert np.array_equal(np.asarray(pre.cache.lengths_B), np.asarray(prefix.lengths_B)), "the prefix cache is kept"


def test_answers_equal_per_prompt_generation(asker):
    """Batched answers sharing each video's prefill == `generate` on each full prompt alone."""
    visuals = [EV.condition_visual(SCENES[0], c) for c in ("real", "blank")]
    qs = [[q.question for q in EV.scene_items(SCENES[0])[:2]]] * 2
    got = asker.answer(visuals, qs, [4, 4])
    for v, row, answers in zip(visuals, qs, got):
        for q, a in zip(row, answers):
            assert a == generate(asker.model, [W.chat_prompt(asker.codec, v, q, asker.ids)], max_new_tokens=4)[0]


def test_items_and_controls():
    for sc in SCENES:
        items = EV.scene_items(sc)
        assert items[0].kind == "caption" and items == EV.scene_items(sc)  # deterministic
        kinds = [q.kind for q in items[1:]]
        assert len(set(kinds)) == len(kinds) and set(kinds) <= set(EV.QA_KINDS) and {"colour", "count"} <= set(kinds)
        assert {q.question for q in items} <= {q.question for q in W.scene_qa(sc, 0)}
    real, blank, shuffled = (EV.condition_visual(SCENES[0], c) for c in EV.CONDITIONS)
    assert real.grid_thw == blank.grid_thw == shuffled.grid_thw
    assert not np.array_equal(real.pixel_values, shuffled.pixel_values)
    assert np.ptp(blank.pixel_values.reshape(-1, 3, 2 * 14 * 14), axis=(0, 2)).max() < 0.1  # one flat colour


def test_score_and_summarize_with_the_truth():
    """The scene graph's own caption and answers score 1 on every component; summaries count them."""
    recs = []
    for sc in SCENES:
        items = EV.scene_items(sc)
        recs.append(EV.score_video(sc, items, [q.answer for q in items]))
        recs.append(EV.score_video(sc, items, [""] * len(items)))
    s = EV.summarize(recs[::2])
    assert s["caption"]["overall"]["mean"] == 1.0 and s["qa_overall"]["mean"] == 1.0
    assert all(v["mean"] == 1.0 for v in s["qa"].values())
    empty = EV.summarize(recs[1::2])
    assert empty["caption"]["overall"]["mean"] == 0.0 and empty["qa_overall"]["mean"] == 0.0
    assert empty["qa_overall"]["n"] == sum(len(r["qa"]) for r in recs[1::2])


@pytest.mark.slow
def test_benchmark_runs_and_resumes(tmp_path, capsys):
    """bench/target_reads_video.py on a random exported target: a table and a JSON line; a second call
    finds every video in --work and runs none."""
    from sparrow_jax.training.target_trainer import export_hf

    sys.path.insert(0, str(ROOT / "bench"))
    import target_reads_video as bench

    cfg = registry.config_from_dict(*registry.read_config_dict(ROOT / "configs" / "tiny.json"))
    export_hf(registry.build_target(cfg, rngs=nnx.Rngs(0)), tmp_path / "t", tokenizer_dir=SHIPPED_DIR)
    argv = ["--target", str(tmp_path / "t"), "--lengths", "8", "--scenes", "2", "--conditions", "real,blank",
            "--work", str(tmp_path / "work"), "--jsonl", str(tmp_path / "r.jsonl"), "--no-progress"]
    res = bench.main(argv)
    assert set(res[8]) == {"real", "blank"} and res[8]["real"]["videos"] == 2
    bench.main(argv)
    out = capsys.readouterr().out
    assert "4 videos, 0 to run" in out and "answers" in out
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["results"] == rows[1]["results"] and "command" in rows[0]
