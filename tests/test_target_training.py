"""Target training (train.py task=target): batch layout and buckets pinned, the whole model (vision
tower + LM) learns an answer that only the video holds, SIGKILL + resume is bit-identical, and the
exported HF directory loads in transformers with logits equal to ours."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import _tiny
from sparrow_jax.models import target as tg
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch
from sparrow_jax.synthetic.sources import colour_samples, colour_token_ids
from sparrow_jax.synthetic.video import COLOURS
from sparrow_jax.training.data import Sample
from sparrow_jax.training.target_trainer import BucketedIndices, TargetTrainer, bucket_key, buckets_of, export_hf, \
    target_batch
from sparrow_jax.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
# The 24-token test vocabulary (20 text ids, vision specials 20-23) with an EOS, so the answer is
# `<colour> <eos>` and the export carries a generation config.
CONFIG = _tiny.hf_config_dict(text={"vocab_size": 24, "eos_token_id": [19]}, image_token_id=20, video_token_id=21,
                              vision_start_token_id=22, vision_end_token_id=23)
MAX_TEXT = 16
CHANCE = 1 / len(COLOURS)


def _config_file(d):
    p = Path(d) / "target.json"
    p.write_text(json.dumps(CONFIG))
    return p


def _overrides(d, out):
    return ["task=target", f"target_config={_config_file(d)}", "target_seed=3", "data=colours", f"out_dir={out}",
            f"max_text={MAX_TEXT}", "global_batch=8", "lr=0.003", "warmup=2", "log_every=1", "tensorboard=false"]


@pytest.fixture(scope="module")
def model_cfg():
    return _tiny.our_config(CONFIG)


def test_batch_layout_is_pinned(model_cfg):
    samples = colour_samples(model_cfg, 8, seed=0)  # clips 3 and 7 are the long ones
    short = [s for i, s in enumerate(samples) if i % 4 != 3]
    assert len({bucket_key(s) for s in short}) == 1 and bucket_key(samples[3]) != bucket_key(short[0])
    b = target_batch(short[:2], model_cfg, max_text=MAX_TEXT)
    n_vis = int(np.count_nonzero(short[0].prompt.mm_token_type_ids))
    assert b.inputs.input_ids_BT.shape == (2, n_vis + MAX_TEXT)
    _, colour_ids, eos = colour_token_ids(model_cfg)
    for row, s in enumerate(short[:2]):
        n = len(s.prompt.input_ids)
        # loss at the last prompt token (predicts the colour) and at the colour (predicts EOS)
        assert np.asarray(b.loss_idx_BL)[row, :2].tolist() == [n - 1, n]
        assert np.asarray(b.labels_BL)[row, :2].tolist() == list(s.response)
        assert s.response[0] in colour_ids and s.response[1] == eos
        assert np.asarray(b.weight_BL)[row].tolist() == [1.0, 1.0] + [0.0] * (MAX_TEXT - 2)
        assert np.asarray(b.first_BL)[row].tolist() == [1.0] + [0.0] * (MAX_TEXT - 1)
        assert np.asarray(b.inputs.input_ids_BT)[row, :n + 2].tolist() == list(s.prompt.input_ids) + list(s.response)
    # Every batch of a bucket has the same shapes: one compiled step.
    b2 = target_batch(short[2:4], model_cfg, max_text=MAX_TEXT)
    assert jax.tree.map(np.shape, b) == jax.tree.map(np.shape, b2)
    with pytest.raises(ValueError, match="mixes visual lengths"):
        target_batch([short[0], samples[3]], model_cfg, max_text=MAX_TEXT)
    with pytest.raises(ValueError, match="exceed max_text 6"):
        target_batch(short[:1], model_cfg, max_text=6)


def test_bucketed_indices_draw_one_bucket_per_batch_and_resume_exactly():
    buckets = {(1,): np.arange(24), (2,): np.arange(24, 32)}
    it = BucketedIndices(buckets, 4, seed=5)
    draws = [next(it) for _ in range(40)]
    long = [bool((d >= 24).all()) for d in draws]
    assert all((d >= 24).all() or (d < 24).all() for d in draws)
    assert 3 <= sum(long) <= 18  # share ~ bucket size (8 / 32 = 0.25)
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(10)]
    it2 = BucketedIndices(buckets, 4, seed=5)
    it2.set_state(state)
    assert all(np.array_equal(a, next(it2)) for a in rest)
    with pytest.raises(ValueError, match=r"bucket \(2,\).*cannot fill a global batch of 12"):
        BucketedIndices(buckets, 12, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """120 steps on the colour task (128 clips, two buckets), held-out metrics before and after."""
    d = tmp_path_factory.mktemp("target")
    cfg = TrainConfig.from_file_and_overrides(None, _overrides(d, d / "run") + [
        "steps=120", "num_samples=128", "log_every=10", "save_every=1000"])
    tr = TargetTrainer(cfg)
    init = jax.device_get(tr.params)
    held = colour_samples(tr.model_cfg, 48, seed=99)
    before = tr.evaluate(held)
    hist = tr.run(progress=False)
    return tr, init, held, before, hist, tr.evaluate(held)


def test_target_learns_to_read_the_video(trained):
    tr, init, held, before, hist, after = trained
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], (hist[0], hist[-1])
    # each logged step names the bucket it drew (its visual tokens per row)
    assert {h["visual_tokens"] for h in hist} <= {s.prompt.visuals[0].num_tokens for s in tr.samples}
    # The answer's first token (the colour) is only in the video: chance is 1/6.
    assert before["first_top1"] <= 2 * CHANCE, before
    assert after["first_top1"] >= 0.5, after
    # Videos shuffled among the held-out questions: the answers no longer match what is shown.
    shuffled = [Sample(held[(i + 4) % len(held)].prompt, s.response) for i, s in enumerate(held)]
    wrong = tr.evaluate(shuffled)
    assert wrong["first_top1"] <= after["first_top1"] - 0.25, (wrong, after)
    # The whole model trained: every parameter (vision tower blocks, merger, LM, head) moved.
    final = dict(nnx.to_flat_state(jax.device_get(tr.params)))
    for path, v in nnx.to_flat_state(init):
        assert not np.array_equal(np.asarray(v[...]), np.asarray(final[path][...])), path


def test_export_loads_in_transformers_with_equal_logits(trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_qwen2_5_vl_parity import hf_inputs  # noqa: PLC0415
    from tokenizers import Tokenizer, models  # noqa: PLC0415

    tr, _, held, *_ = trained
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(24)}, unk_token="t0")).save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                               "eos_token": "t19"}))
    out = export_hf(tr.model(), tmp_path / "hf", tokenizer_dir=tok_dir)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id in (19, [19])
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == 19
    model = tr.model()
    graphdef, params = nnx.split(model)

    @jax.jit
    def logits(params, batch):
        m = nnx.merge(graphdef, params)
        return m.logits(tg.forward(m, batch)[0])

    for s in (held[0], held[3]):  # a short and a long clip
        p = s.prompt
        ours = np.asarray(logits(params, prepare_prefill_batch([p], model.cfg)))[0, :len(p.input_ids)]
        with torch.no_grad():
            ref = hf(**hf_inputs(p)).logits[0].numpy()
        assert float(np.abs(ours - ref).max()) <= 1e-4


# ----------------------------------------------------------------------------------- exact resume


def test_resume_from_a_checkpoint_is_bit_identical(trained):
    """Continue the trained run 6 steps (checkpoints every 2), drop the last two checkpoints (as if the
    run died after step 122), resume: parameters, optimizer, RNG, step and the bucketed data iterator
    come back, and the final parameters equal the uninterrupted run's bit for bit, also with a stop at
    an odd step in between (`run(stop_at=...)`, train.py --stop-at). Both buckets are
    drawn after the resume point. Same trainer object: its compiled steps are reused."""
    tr = trained[0]
    start = tr.step
    tr.cfg = dataclasses.replace(tr.cfg, steps=start + 6, save_every=2)
    it = BucketedIndices(buckets_of(tr.samples), tr.cfg.global_batch, tr.cfg.data_seed)
    it.set_state(json.loads(json.dumps(tr.data_iter.get_state())))
    drawn = [bucket_key(tr.samples[int(next(it)[0])]) for _ in range(6)]
    assert len(set(drawn[2:])) == 2, drawn
    tr.run(progress=False)
    ref = jax.device_get(tr.params)
    mngr = tr.checkpoint_manager()
    for step in (start + 4, start + 6):
        mngr.delete(step)
    assert mngr.latest_step() == start + 2
    # Stopped early (train.py --stop-at) and resumed: the schedule is the full run's, nothing changes.
    tr.run(progress=False, stop_at=start + 3)
    assert tr.step == start + 3
    tr.run(progress=False)
    assert tr.step == start + 6
    got = dict(nnx.to_flat_state(jax.device_get(tr.params)))
    for path, v in nnx.to_flat_state(ref):
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(v[...]), err_msg=str(path))


# ------------------------------------------------------------------------- train.py, SIGKILL + resume


def _train(overrides, extra=(), env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / "train.py"), "--no-progress", *extra] + [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _done(p, code=0):
    out, _ = p.communicate(timeout=600)
    assert p.returncode == code, out[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_during_save_then_resume_is_bit_identical(tmp_path):
    """train.py, A: 6 steps uninterrupted. D: SIGKILLed while its step-4 checkpoint is being written
    (async), then resumed from step 2. One bucket (the two-bucket resume is the test above);
    grad_accum=2 stacks micro-batches."""
    common = lambda name: _overrides(tmp_path, tmp_path / name) + [  # noqa: E731
        "data=colours_short", "steps=6", "save_every=2", "grad_accum=2", "num_samples=16"]
    a = _train(common("A"), ["--export", str(tmp_path / "A" / "hf")])
    killed = _train(common("D"), env_extra={"SPARROW_KILL_DURING_SAVE": "4"})
    _done(a)
    _done(killed, -signal.SIGKILL)
    ckpts = sorted(p.name for p in (tmp_path / "D" / "checkpoints").iterdir())
    assert "2" in ckpts and "4" not in ckpts, ckpts
    assert "resumed at step 2" in _done(_train(common("D"), ["--export", str(tmp_path / "D" / "hf")]))
    log = [json.loads(x)["step"] for x in (tmp_path / "D" / "metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6], log  # steps 3-4 ran twice (resumed from step 2), logged once
    ref, got = (load_file(str(tmp_path / r / "hf" / "model.safetensors")) for r in ("A", "D"))
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert json.loads((tmp_path / "D" / "hf" / "generation_config.json").read_text())["eos_token_id"] == [19]


def test_pixel_targets_pool_each_merged_token_from_its_frames(model_cfg):
    """pixel_targets: merged token j's entries are block means of exactly its own 2x2 patches and 2
    frames (checked against the frames themselves), so the probe asks each token about its region."""
    from sparrow_jax.io.vision_inputs import VisionPreprocessConfig, patchify
    from sparrow_jax.training.target_trainer import pixel_targets

    v = model_cfg.vision
    p, m, tp = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
    frames = np.random.default_rng(0).normal(size=(2 * tp, 2 * p * m, 3 * p * m, 3)).astype(np.float32)
    pixels, (gt, gh, gw) = patchify(frames, VisionPreprocessConfig(patch_size=p, merge_size=m, temporal_patch_size=tp))
    got = np.asarray(pixel_targets(jax.numpy.asarray(pixels), v, pool=p // 2))
    assert got.shape == (gt * gh * gw // m**2, m * m * 3 * tp * 4)
    j, (t, y, x) = 7, (1, 0, 1)  # merged token 7 of a (2, 2, 3)-unit grid: frame pair 1, unit row 0, col 1
    region = frames[t * tp:(t + 1) * tp, y * p * m:(y + 1) * p * m, x * p * m:(x + 1) * p * m]  # [tp, pm, pm, 3]
    blocks = region.reshape(tp, m, 2, p // 2, m, 2, p // 2, 3).mean((3, 6))  # [tp, mh, by, mw, bx, C]
    want = blocks.transpose(1, 3, 5, 0, 2, 4).reshape(-1)  # (mh, mw, C, tp, by, bx): the rows' order
    np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-6)


def test_probe_loss_separates_collapsed_from_informative_features():
    """probe_unexplained is near 0 for features that vary with the pixels and near 1 for one shared
    direction plus a small wiggle, even when the wiggle encodes the pixels exactly (what the LM's
    RMSNorm leaves of it is noise-level); gradients are finite."""
    from sparrow_jax.training.target_trainer import probe_unexplained

    rng = np.random.default_rng(0)
    Y = rng.normal(size=(512, 24)).astype(np.float32)
    mix = rng.normal(size=(24, 64)).astype(np.float32)
    informative = Y @ mix + 0.1 * rng.normal(size=(512, 64)).astype(np.float32)
    collapsed = 100.0 * np.ones((512, 64), np.float32) + 0.01 * (Y @ mix)
    assert float(probe_unexplained(informative, Y)) < 0.05
    assert float(probe_unexplained(collapsed, Y)) > 0.9
    g = jax.grad(lambda f: probe_unexplained(f, Y))(jax.numpy.asarray(collapsed))
    assert np.isfinite(np.asarray(g)).all() and float(np.abs(g).max()) > 0


def test_reinit_vision_replaces_the_tower_and_keeps_the_lm(model_cfg):
    """reinit_vision: the vision tower equals a fresh build of that seed (output layer scaled, bias 0),
    every LM parameter is untouched."""
    from sparrow_jax.models import registry
    from sparrow_jax.training.target_trainer import reinit_vision

    model = registry.build_target(model_cfg, rngs=nnx.Rngs(7))
    before = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    reinit_vision(model, seed=3, out_scale=0.5)
    fresh = registry.build_target(model_cfg, rngs=nnx.Rngs(3))
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    ref = dict(nnx.to_flat_state(nnx.state(fresh, nnx.Param)))
    for path, v in after.items():
        got = np.asarray(v[...])
        if path[0] != "visual":
            np.testing.assert_array_equal(got, np.asarray(before[path][...]), err_msg=str(path))
        elif path[-2:] == ("fc2", "kernel"):
            np.testing.assert_allclose(got, 0.5 * np.asarray(ref[path][...]), rtol=1e-6)
        elif path[-2:] == ("fc2", "bias"):
            assert not got.any()
        else:
            np.testing.assert_array_equal(got, np.asarray(ref[path][...]), err_msg=str(path))


def test_text_only_samples_train_with_the_probe_loss_on(tmp_path, model_cfg):
    """A bucket without visuals (text-only chat) trains: no vision tower pass, no probe term, the
    answer loss falls on a memorisable mapping."""
    from sparrow_jax.io.vision_inputs import build_multimodal_prompt  # noqa: PLC0415
    from sparrow_jax.synthetic.sources import _vision_ids  # noqa: PLC0415

    rng = np.random.default_rng(0)
    samples = []
    for _ in range(16):
        a = int(rng.integers(1, 9))
        samples.append(Sample(build_multimodal_prompt([[1, 2, a]], _vision_ids(model_cfg)), (a + 9, 19)))
    cfg = TrainConfig.from_file_and_overrides(None, _overrides(tmp_path, tmp_path / "run") + [
        "steps=30", "vision_aux_weight=1.0", "save_every=1000"])
    hist = TargetTrainer(cfg, samples=samples).run(progress=False)
    assert "vision_unexplained" not in hist[-1] and np.isfinite(hist[-1]["loss"])
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], (hist[0], hist[-1])
    assert {h["visual_tokens"] for h in hist} == {0}  # the bucket each logged step drew: no visuals


def test_export_of_a_world_run_writes_its_scene_settings(tmp_path):
    """A target trained on the world exports world.json with the scene settings it saw (the demo and the
    benches render its scenes that way); data without scene settings writes none."""
    from sparrow_jax.synthetic import world as W  # noqa: PLC0415

    tiny = ROOT / "configs" / "tiny.json"
    ds = W.world_source(_tiny.our_config(json.loads(tiny.read_text())), 4,
                        world={"sprite_scale": 2.0, "max_visible": 1, "max_events": 0})
    cfg = TrainConfig.from_file_and_overrides(None, [
        "task=target", f"target_config={tiny}", "target_seed=0", f"out_dir={tmp_path / 'run'}", "tensorboard=false",
        "global_batch=2", "max_text=128"])
    out = TargetTrainer(cfg, samples=ds).export(tmp_path / "hf")
    assert W.scene_settings_from(out / W.WORLD_FILE) == ds.cfg == W.WorldConfig(sprite_scale=2.0, max_visible=1,
                                                                                 max_events=0)
    assert not (export_hf(_tiny.random_model(_tiny.our_config(CONFIG)), tmp_path / "plain") / W.WORLD_FILE).exists()
