"""Draft training: IVSB layout and MTP shift pinned, online == offline, the loss learns, sharded ==
unsharded, two processes == one, online split over 8 devices / 2 processes == offline (the target's
forward split by rows, never replicated), SIGKILL + resume is bit-identical."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import _tiny
from sparrow_jax.io.draft_checkpoint import save_draft
from sparrow_jax.models import registry
from sparrow_jax.models.draft import DraftConfig, SparrowDraft
from sparrow_jax.synthetic.samples import synthetic_samples
from sparrow_jax.training.data import CurriculumBatches, Sample, ShardSource, SlotSpec, collate, slot_layout
from sparrow_jax.training.features import FeatureSpec, extract_features, fill_features, online_batch, records_for, \
    reference_unit
from sparrow_jax.training.losses import LossConfig, draft_loss, draft_passes, slot_inputs
from sparrow_jax.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
L, M = 32, 16
MID = FeatureSpec(m_star=1)  # IVSB's layer-m* visual states
IVSB = SlotSpec("ivsb_mid")  # Sparrow's training layout (view none + IVSB)


def test_ivsb_slot_layout_is_pinned():
    is_vis = np.asarray([0, 0, 1, 1, 1, 0, 0], bool)  # t0, <vs>, 3 visual, <ve>, text
    # Official convention: the sequence starts at (t1, h0); t0 has no slot. Text items t1, t5, t6.
    src, is_text, pos, text_slot = slot_layout(is_vis, L=4, view="ivsb_mid")
    assert src.tolist() == [0, 4, 5, 6, 1, 2]  # visual sources live after the L text sources
    assert is_text.tolist() == [True, False, False, False, True, True]
    assert pos.tolist() == [0, 0, 0, 0, 1, 2]  # visual slots sit at the <vision_start> position
    assert text_slot.tolist() == [0, 4, 5]
    src, is_text, pos, text_slot = slot_layout(is_vis, L=4, view="none")
    assert src.tolist() == [0, 1, 2] and pos.tolist() == [0, 1, 2] and text_slot.tolist() == [0, 1, 2]
    src, is_text, pos, text_slot = slot_layout(is_vis, L=4, view="msd")  # full positions
    assert src.tolist() == [0, 4, 5, 6, 1, 2] and pos.tolist() == [0, 1, 2, 3, 4, 5]
    src, is_text, pos, text_slot = slot_layout(is_vis, L=4, view="pruned", kept_vis=[1])
    assert src.tolist() == [0, 5, 1, 2] and pos.tolist() == [0, 1, 2, 3] and text_slot.tolist() == [0, 2, 3]


@pytest.fixture(scope="module")
def records(small_target):
    samples = synthetic_samples(small_target.cfg, 8, seed=1, text_vocab=_tiny.SMALL_TEXT_VOCAB)
    return samples, records_for(small_target, samples, spec=MID)


def test_mtp_pass_feeds_the_previous_slot_output(small_target, records):
    _, recs = records
    draft = SparrowDraft(DraftConfig.for_target(small_target.cfg), rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, collate(recs[:2], L=L, M=M, spec=IVSB))
    outs = draft_passes(draft, small_target.embed, batch, LossConfig(mtp_steps=1))
    # Rebuild pass 1 by hand: text slot t's h_{t-1} is pass 0's output at slot t-1 (a visual slot for
    # <vision_end>); the first slot keeps the target's h0.
    x0 = slot_inputs(draft, small_target.embed(batch.tok_BL), batch.hprev_BLD, batch)
    from sparrow_jax.models.attention import MaskSpec
    y0, _ = draft.run_layers(x0, batch.slot_pos_BS, MaskSpec(kv_len_B=batch.slot_len_B, causal=True))
    prev = np.asarray(batch.text_slot_BL) - 1
    hprev1 = np.where(prev[..., None] >= 0, np.take_along_axis(np.asarray(y0), np.maximum(prev, 0)[..., None], 1),
                      np.asarray(batch.hprev_BLD))
    x1 = slot_inputs(draft, small_target.embed(batch.tok_BL), jnp.asarray(hprev1), batch)
    y1, _ = draft.run_layers(x1, batch.slot_pos_BS, MaskSpec(kv_len_B=batch.slot_len_B, causal=True))
    y1_text = np.take_along_axis(np.asarray(y1), np.asarray(batch.text_slot_BL)[..., None], 1)
    np.testing.assert_allclose(np.asarray(outs[1]), y1_text, atol=1e-6)
    vis_end_slots = [s for s in np.asarray(batch.text_slot_BL)[0] if s > 0 and not batch.slot_is_text_BS[0, s - 1]]
    assert vis_end_slots, "the layout must contain a text slot right after a visual slot"


def test_online_and_offline_features_give_the_same_loss(small_target, records):
    samples, recs = records
    draft = SparrowDraft(DraftConfig.for_target(small_target.cfg), rngs=nnx.Rngs(0))
    lcfg = LossConfig()
    off = jax.tree.map(jnp.asarray, collate(recs[:4], L=L, M=M, spec=IVSB))
    on = fill_features(small_target, online_batch(samples[:4], small_target.cfg, L=L, M=M, slots=IVSB), MID)
    l_off, m_off = draft_loss(draft, small_target.embed, small_target.logits, off, lcfg)
    l_on, m_on = draft_loss(draft, small_target.embed, small_target.logits, on, lcfg)
    assert abs(float(l_off) - float(l_on)) <= 1e-5
    for k in m_off:
        assert abs(float(m_off[k]) - float(m_on[k])) <= 1e-5, k


def test_online_rows_of_mixed_frame_sizes_equal_offline(small_target):
    """Online rows whose frames have 28, 56 or 84 pixels (1, 4, 9 visual tokens per frame group; different
    window segments) and text-only rows: every frame group is grown to the largest and stacked, and the
    features and loss equal offline extraction (the whole batch's visuals encoded unpadded) — also when
    the rows are built in three parts, as three processes do, padded to their agreed shapes (the
    84-pixel frames only in one part, no visuals in another: it pads with the run's reference unit)."""
    cfg = small_target.cfg
    rng = np.random.default_rng(5)
    samples = [s for side in (56, 28, 84) for s in
               synthetic_samples(cfg, 2, seed=side, text_vocab=_tiny.SMALL_TEXT_VOCAB, side=side)] + [
        Sample(_tiny.prompt([_tiny.random_text(rng, 6, _tiny.SMALL_TEXT_VOCAB)]), (3, 4, 5)) for _ in range(2)]
    recs = records_for(small_target, samples, spec=MID)
    off = jax.tree.map(jnp.asarray, collate(recs, L=L, M=32, spec=IVSB))
    draft = SparrowDraft(DraftConfig.for_target(cfg), rngs=nnx.Rngs(0))
    loss = lambda b: float(draft_loss(draft, small_target.embed, small_target.logits, b, LossConfig())[0])  # noqa: E731

    def check(on, rows):
        for b, r in enumerate(recs[i] for i in rows):
            n, m = len(r.text_ids), len(r.vis)
            np.testing.assert_allclose(np.asarray(on.h_BLD[b, :n]), np.asarray(off.h_BLD[rows[b], :n]), atol=1e-5)
            np.testing.assert_allclose(np.asarray(on.vis_BMD[b, :m]), np.asarray(off.vis_BMD[rows[b], :m]), atol=1e-5)

    ob = online_batch(samples, cfg, L=L, M=32, slots=IVSB)
    assert ob.prefill.units_BU.shape[:3] == (8, 2, 36)  # 2 frame groups per row, grown to 6 x 6 patches
    on = fill_features(small_target, ob, MID)
    check(on, list(range(8)))
    assert abs(loss(off) - loss(on)) <= 1e-5
    parts, unit = ([0, 2, 3], [4, 5], [6, 7]), reference_unit(samples, cfg)  # the run's unit: a 56-pixel group
    shapes = []
    for rows in parts:
        online_batch([samples[i] for i in rows], cfg, L=L, M=32, slots=IVSB, unit=unit,
                     agree=lambda v: shapes.append(v) or v)
    agreed = np.max(shapes, axis=0)
    for rows in parts:
        ob = online_batch([samples[i] for i in rows], cfg, L=L, M=32, slots=IVSB, unit=unit, agree=lambda v: agreed)
        assert ob.prefill.units_BU.shape[1:3] == (2, 36)
        check(fill_features(small_target, ob, MID), list(rows))


def _config_file(tmp):
    p = Path(tmp) / "target.json"
    p.write_text(json.dumps(_tiny.SMALL_VOCAB_CONFIG))
    return p


@pytest.fixture(scope="module")
def feature_dir(small_target, tmp_path_factory):
    """small_target's features of 48 samples, and small_target itself as a checkpoint (`target/` beside
    them): the runs train against the target that extracted their features, so an online run (the target
    in the step) sees the same numbers. (A random target from `target_config` + `target_seed` would not
    be small_target: conftest scales its weights x2.)"""
    d = tmp_path_factory.mktemp("features")
    samples = synthetic_samples(small_target.cfg, 48, seed=2, text_vocab=_tiny.SMALL_TEXT_VOCAB)
    extract_features(small_target, samples, d, spec=MID, shard_size=16, progress=False)
    registry.save_target(small_target, _target_dir(d))
    return d


def _target_dir(features):
    return Path(features).parent / f"{Path(features).name}_target"


def _base_overrides(features, out):
    return [f"target={_target_dir(features)}", f"features={features}", f"out_dir={out}",
            f"max_text={L}", f"max_visual={M}", "m_star=1", "global_batch=8", "lr=0.003", "warmup=2", "log_every=1",
            "tensorboard=false"]


def test_trainer_online_equals_offline_on_one_device(small_target, feature_dir, tmp_path):
    """The Trainer's own step, online (the target in the step, rows laid out one by one) vs offline
    (feature_dir), on one device with gradient accumulation: the same losses (and the runs' target is
    the one that extracted the features, which the 2-process online run relies on)."""
    run = ["steps=2", "save_every=100", "grad_accum=2"]
    common = lambda name: _base_overrides(feature_dir, tmp_path / name) + run  # noqa: E731
    off = Trainer(TrainConfig.from_file_and_overrides(None, common("off"))).run(progress=False)
    on_cfg = TrainConfig.from_file_and_overrides(None, [o for o in common("on") if not o.startswith("features=")] +
                                                 ["online=true", "num_samples=48"])
    on = Trainer(on_cfg, samples=_tiny.feature_samples(small_target.cfg, 48)).run(progress=False)
    assert [h["step"] for h in on] == [h["step"] for h in off] == [1, 2]
    for a, b in zip(off, on):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])


def test_msd_curriculum_text_first_then_a_rising_visual_share_and_exact_resume():
    visual = np.arange(40) % 4 != 0  # 10 text-only records, 30 visual
    it = CurriculumBatches(visual, 64, seed=3, text_steps=5, ramp_steps=10)
    shares = [visual[next(it)].mean() for _ in range(20)]
    assert shares[:5] == [0.0] * 5  # text-only first
    assert shares[-5:] == [1.0] * 5  # then only visual
    assert shares[7] < shares[10] < shares[13], shares  # rising in between (64 rows: loose enough)
    state = it.get_state()
    ahead = [next(it).tolist() for _ in range(3)]
    it2 = CurriculumBatches(visual, 64, seed=3, text_steps=5, ramp_steps=10)
    it2.set_state(state)
    assert [next(it2).tolist() for _ in range(3)] == ahead
    with pytest.raises(ValueError, match="needs text-only and visual records"):
        CurriculumBatches(np.ones(8, bool), 4, seed=0, text_steps=1, ramp_steps=1)


def test_extraction_is_resumable_and_indexed(feature_dir, small_target):
    src = ShardSource(feature_dir)
    assert len(src) == 48 and src.meta["m_star"] == 1
    before = (Path(feature_dir) / "features-00001.safetensors").stat().st_mtime_ns
    extract_features(small_target, [None] * 48, feature_dir, spec=MID, shard_size=16, progress=False)  # all done
    assert (Path(feature_dir) / "features-00001.safetensors").stat().st_mtime_ns == before


def test_extraction_reads_lazy_sources_by_index(small_target, tmp_path):
    """A lazy sample source (world.WorldDataset renders on access) takes integer indices only: extraction
    reads it item by item, shard by shard, and writes what a list gives."""
    samples = synthetic_samples(small_target.cfg, 7, seed=4, text_vocab=_tiny.SMALL_TEXT_VOCAB)

    class IntegersOnly:
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            if not isinstance(i, int):
                raise TypeError(f"index {i!r}: integers only")
            return samples[i]

    lazy = extract_features(small_target, IntegersOnly(), tmp_path / "lazy", spec=MID, shard_size=4, batch_size=3,
                            progress=False)
    eager = extract_features(small_target, samples, tmp_path / "list", spec=MID, shard_size=4, progress=False)
    assert [s["records"] for s in lazy["shards"]] == [s["records"] for s in eager["shards"]] == [4, 3]
    a, b = ShardSource(tmp_path / "lazy"), ShardSource(tmp_path / "list")
    for i in range(7):
        np.testing.assert_allclose(a[i].h, b[i].h, atol=1e-5)


def test_learning_lowers_loss_and_raises_heldout_top1(small_target, feature_dir, tmp_path):
    held = records_for(small_target, synthetic_samples(small_target.cfg, 8, seed=99, text_vocab=_tiny.SMALL_TEXT_VOCAB),
                       spec=MID)
    cfg = TrainConfig.from_file_and_overrides(None, _base_overrides(feature_dir, tmp_path / "run") +
                                              ["steps=40", "save_every=100", "mtp_steps=1"])
    tr = Trainer(cfg)
    before = tr.evaluate(held)
    hist = tr.run(progress=False)
    after = tr.evaluate(held)
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    # Stated margin: held-out top-1 agreement with the target rises by at least 0.2 in 40 steps.
    assert after["pass0/top1"] >= before["pass0/top1"] + 0.2, (before["pass0/top1"], after["pass0/top1"])
    assert after["loss"] < before["loss"]


def test_init_draft_starts_from_the_saved_draft_and_refuses_another(small_target, feature_dir, tmp_path):
    """init_draft (fine-tuning): the run starts from the saved draft's weights exactly, and a saved draft of
    another view or bridge layer is refused with the field named."""
    base = _base_overrides(feature_dir, tmp_path / "a") + ["steps=3", "save_every=100"]
    trained = Trainer(TrainConfig.from_file_and_overrides(None, base))
    trained.run(progress=False)
    save_draft(trained.draft(), tmp_path / "saved")
    again = Trainer(TrainConfig.from_file_and_overrides(
        None, _base_overrides(feature_dir, tmp_path / "b") + [f"init_draft={tmp_path / 'saved'}", "seed=5"]))
    fresh = Trainer(TrainConfig.from_file_and_overrides(None, _base_overrides(feature_dir, tmp_path / "c") + ["seed=5"]))
    for got, want in zip(jax.tree.leaves(again.params), jax.tree.leaves(trained.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(fresh.params)))
    with pytest.raises(ValueError, match=r"init_draft .*saved.*m_star: 1 in the file, 2 in this run"):
        Trainer(TrainConfig.from_file_and_overrides(
            None, _base_overrides(feature_dir, tmp_path / "d") + [f"init_draft={tmp_path / 'saved'}", "m_star=2"]))
    import train  # the CLI says it in one line, without a traceback

    with pytest.raises(SystemExit) as e:
        train.main(["--no-progress"] + [a for o in _base_overrides(feature_dir, tmp_path / "e") +
                                        [f"init_draft={tmp_path / 'missing'}"] for a in ("--set", o)])
    assert str(e.value).startswith("train.py: error: ") and "missing" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------- subprocess runs (devices, hosts)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(overrides, devices=1, extra=(), env_extra=None, wait=True):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / "train.py"), "--no-progress", *extra] + [a for o in overrides for a in ("--set", o)]
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    return p


def _params(out_dir):
    return load_file(str(Path(out_dir) / "draft" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(feature_dir, tmp_path_factory):
    """A: 1 device. B: 8 devices, mesh (2,2,2). C: 2 processes x 4 devices, mesh (2,2,2).
    D: 1 device, SIGKILLed while its step-4 checkpoint is being written, then resumed.
    E: online (the target in the step) on feature_dir's samples, 2 processes x 4 devices, mesh (2,2,2)."""
    d = tmp_path_factory.mktemp("runs")
    common = lambda name: _base_overrides(feature_dir, d / name) + ["steps=6", "save_every=2", "grad_accum=2"]  # noqa: E731
    export = lambda name: ["--export", str(d / name / "draft")]  # noqa: E731
    a = _train(common("A"), 1, export("A"), wait=False)
    b = _train(common("B") + ["mesh=[2,2,2]"], 8, export("B"), wait=False)
    for p in (a, b):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    port = _free_port()
    procs = [_train(common("C") + ["mesh=[2,2,2]"], 4, [*export("C"), "--coordinator", f"127.0.0.1:{port}",
                                                         "--num-processes", "2", "--process-id", str(i)], wait=False)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    port = _free_port()
    online = [o for o in common("E") if not o.startswith("features=")] + [
        "online=true", "data=_tiny:feature_samples", "num_samples=48", "mesh=[2,2,2]"]
    tests_path = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    procs = [_train(online, 4, [*export("E"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i)], env_extra=tests_path, wait=False) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    killed = _train(common("D"), 1, env_extra={"SPARROW_KILL_DURING_SAVE": "4"}, wait=False)
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (d / "D" / "checkpoints").iterdir())
    _train(common("D"), 1, export("D"))
    return d, ckpts


@pytest.mark.slow
def test_sharded_8_devices_equals_1_device(runs):
    d, _ = runs
    a, b = _params(d / "A"), _params(d / "B")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_8_devices(runs):
    d, _ = runs
    b, c = _params(d / "B"), _params(d / "C")
    for k in b:
        np.testing.assert_allclose(c[k], b[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_online_two_processes_equal_offline(runs):
    """Online, each of 2 processes lays out and encodes only its own rows' videos and the target's
    forward runs split over the rows: the same losses and weights as offline features (run B)."""
    d, _ = runs
    off, on = ([json.loads(x) for x in (d / r / "metrics.jsonl").read_text().splitlines()] for r in ("B", "E"))
    assert [m["step"] for m in on] == [m["step"] for m in off] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(off, on):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    b, e = _params(d / "B"), _params(d / "E")
    for k in b:
        np.testing.assert_allclose(e[k], b[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_online_step_on_8_devices_splits_the_target_by_rows_and_equals_offline(tmp_path):
    """bench/online_step.py on a (data 4, tensor 2) mesh: online losses == offline on the same samples;
    the compiled step takes the target's inputs split by rows (the tower units' layouts too, none
    replicated) and its parameters split by their declared axes; every value of the target's sequence length
    T is per-device (2 of the 8 rows), none the whole batch."""
    cfg = _config_file(tmp_path)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "online_step.py"), "--mesh", "4,1,2",
                          "--target-config", str(cfg), "--text-vocab", str(_tiny.SMALL_TEXT_VOCAB), "--steps", "2"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for a, b in zip(r["losses"]["offline"], r["losses"]["online"], strict=True):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
    rows = "P(('data', 'fsdp')"
    for name, spec in r["prefill_shardings"].items():
        assert spec.startswith(rows), (name, spec)
    tp = r["target_param_shardings"]
    assert tp["model.layers.0.self_attn.q_proj.kernel.value"] == "P('fsdp', 'tensor')"
    assert tp["model.layers.0.mlp.down_proj.kernel.value"] == "P('tensor', 'fsdp')"
    T, B = r["T"], r["global_batch"]
    leading = {int(s.split(",")[0]) for s in r["shapes_with_T"] if "," in s and s.split(",")[1] == str(T)}
    assert B // 4 in leading and B not in leading, r["shapes_with_T"]


@pytest.mark.slow
def test_sigkill_during_save_then_resume_is_bit_identical(runs):
    d, ckpts_after_kill = runs
    # The step-4 save was cut off: only step 2 is a finalized checkpoint (4 may exist as a tmp dir).
    assert "2" in ckpts_after_kill and "4" not in ckpts_after_kill, ckpts_after_kill
    log = (d / "D" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [1, 2, 3, 4, 5, 6], "steps 3-4 ran twice (resumed from step 2), logged once"
    a, dd = _params(d / "A"), _params(d / "D")
    for k in a:
        np.testing.assert_array_equal(dd[k], a[k], err_msg=k)
