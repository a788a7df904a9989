"""bench/compile_time.py: --fast (configs/tiny.json) lowers and compiles every stage and writes one record
each; and the abstract inputs it lowers against are exactly the shapes decode runs on (engine.prepare
on a real random target with the same prompt), so it times the programs a user compiles."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import compile_time as ct  # noqa: E402

from sparrow_jax.decoding import engine as E  # noqa: E402
from sparrow_jax.models import registry  # noqa: E402
from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: E402


def avals(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_time") / "out.jsonl"
    return ct.main(["--fast", "--jsonl", str(out)]), out


def test_fast_records_every_stage_with_times(fast):
    records, out = fast
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == records
    assert [r["stage"] for r in records] == list(ct.STAGES)
    for r in records:
        assert {"command", "machine", "date", "jax", "flax", "backend"} <= set(r)
        assert r["config"] == "tiny.json" and r["layers"] == 6 and r["dtype"] == "bfloat16"
        for key in ("trace_s", "to_hlo_s", "lower_s", "compile_s", "compile_cpu_s", "peak_rss_gib"):
            assert r[key] > 0, (r["stage"], key)
        assert r["lower_s"] == pytest.approx(r["trace_s"] + r["to_hlo_s"])
        assert r["stablehlo_lines"] > 0 and r["jaxpr_eqns"] > 0
        assert r["peak_rss_gib"] >= r["peak_rss_gib_lowered"] >= r["peak_rss_gib_before"]
    spec = {r["stage"]: r for r in records}["spec_loop"]
    assert spec["tree"] == "6-2-2" and spec["visual_tokens"] == 2 * 4**2  # 2 temporal patches of 4x4 merged


def test_abstract_inputs_are_what_decode_runs_on():
    """The bench's abstract batches, caches and loop inputs == engine.prepare's real ones (same prompt,
    tree, max_new_tokens, dtype) on a random tiny target: the lowered programs are decode's."""
    kw = dict(dtype="bfloat16", frames=4, frame_side=112, tree="6-2-2", max_new_tokens=8)
    inp = ct.build_inputs(ct.TINY, **kw)
    cfg = inp.cfg
    target = registry.build_target(cfg, rngs=nnx.Rngs(0), dtype=ct.DTYPES["bfloat16"])
    draft = SparrowDraft(DraftConfig.for_target(cfg, visual_view=ct.VIEW), rngs=nnx.Rngs(1),
                         dtype=ct.DTYPES["bfloat16"])
    prompt = ct.video_prompt(cfg, kw["frames"], kw["frame_side"], 32)
    p = E.prepare(target, draft, [prompt], inp.ecfg, mode="text_only")
    assert avals(p.batch) == avals(inp.batch_spec)
    assert avals(registry.prepare_batch_for(cfg)([prompt], cfg)) == avals(inp.batch_ar)
    assert avals(nnx.split(target)[1]) == avals(inp.tparams) and avals(nnx.split(draft)[1]) == avals(inp.dparams)
    x = ct.loop_inputs(inp)
    real = dict(tcache=p.pre.cache, dcache=p.dcache, last_logits_BV=p.pre.last_logits_BV,
                last_hidden_BD=p.pre.last_hidden_BD, rope_delta_B=p.pre.rope_delta_B)
    assert avals(real) == avals({k: x[k] for k in real})
    assert x["key"].dtype == jax.random.key(0).dtype
    _, args, _ = ct.stage_call("draft_prefill", inp)  # target.prefill's outputs for the draft, then its layout
    assert avals((p.pre.draft_e_BPD, p.pre.draft_hprev_BPD, p.pre.draft_text_BP, p.layout.pos_BP, p.layout.len_B,
                  p.layout.next_pos_B)) == avals(args[2:])
    assert inp.visual_tokens == int(np.asarray(p.batch.vis_len_B)[0])


def test_bad_arguments_are_usage_errors(capsys):
    for argv, words in ((["--frames", "0"], "--frames 0"), (["--layers", "1"], "at least 2"),
                        (["--tree", "1-0-0"], "--tree 1-0-0"), (["--config", "/nope.json"], "/nope.json")):
        with pytest.raises(SystemExit) as e:
            ct.parse_args(argv)
        assert e.value.code == 2
        assert words in capsys.readouterr().err
