"""The engine with impl="pallas" (what `decode.py --attention pallas` selects; interpret mode on CPU)
gives token-identical greedy output to the XLA path on a tiny target, with the kernels — not the
XLA fallback — doing the attention: prefill kernel (target LM, vision tower, draft prefill), VATA
kernel (the draft's short text-only cache) and split-K tree-verify kernel (the target's longer
video cache)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import _tiny
from pallas_kernels import dispatch
from sparrow_jax.decoding import engine as E
from sparrow_jax.decoding.autoregressive import generate as ar_generate
from sparrow_jax.decoding.tree import TreeSpec

V = _tiny.SMALL_TEXT_VOCAB
MAX_NEW = 10


def video_prompts(cfg):
    """Two rows whose video makes the target prompt bucket 128 while the draft's text-only
    sequence stays in bucket 64: target cache capacity 192, draft cache capacity 128."""
    rng = np.random.default_rng(3)
    return [_tiny.prompt([_tiny.random_text(rng, n, V), _tiny.visual(rng, (4, 8, 8)), _tiny.random_text(rng, 3, V)],
                         cfg) for n in (4, 7)]


def test_spec_engine_pallas_equals_xla_token_for_token(small_target, random_draft):
    prompts = video_prompts(small_target.cfg)
    tree = TreeSpec.parse("16-3-4")
    ref, _ = E.generate(small_target, random_draft, prompts, E.EngineConfig(tree=tree, max_new_tokens=MAX_NEW))
    before = dict(dispatch.route_counts)
    # split-K from capacity 160: the target's 192-slot cache -> tree_verify, the draft's 128 -> VATA
    with dispatch.override(split_min_len=160):
        out, res = E.generate(small_target, random_draft, prompts,
                              E.EngineConfig(tree=tree, max_new_tokens=MAX_NEW, impl="pallas"))
    assert out == ref
    assert all(len(t) == MAX_NEW for t in out)
    assert res.tcache.capacity == 192 and res.dcache.capacity == 128
    used = {n: dispatch.route_counts[n] - before.get(n, 0) for n in dispatch.KERNELS + ("xla",)}
    assert used["xla"] == 0, used
    assert all(used[n] > 0 for n in dispatch.KERNELS), used


@pytest.mark.slow
def test_autoregressive_pallas_equals_xla(small_target):
    prompts = video_prompts(small_target.cfg)
    ref = ar_generate(small_target, prompts, max_new_tokens=MAX_NEW, eos_ids=())
    out = ar_generate(small_target, prompts, max_new_tokens=MAX_NEW, eos_ids=(), impl="pallas")
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
