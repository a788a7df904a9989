"""Real-world inputs and faults (issue 13): decode.py refuses bad arguments and files before any model is
loaded, each with one line naming the argument or file; preprocessing follows the target checkpoint
(transformers-written, non-default patch / merge / temporal patch); training survives damaged
checkpoints and stops on non-finite values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import _tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import decode  # noqa: E402
from sparrow_jax import api  # noqa: E402
from sparrow_jax.models import registry  # noqa: E402


def error_of(argv, capsys):
    """Run decode.py expecting a refusal: (exit code, the single stderr line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        decode.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decode.py: error: "), err
    return e.value.code, err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    return (d, *_tiny.write_cli_files(d))


@pytest.fixture
def no_model(monkeypatch):
    """Any model construction or loading fails the test: refusals must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(registry, "load_target", boom)
    monkeypatch.setattr(registry, "build_target", boom)


# (arguments, text the one-line message must contain); exit code 2: usage errors.
USAGE_ERRORS = [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be positive"),
    (["--max-new-tokens", "-3", "--mode", "ar"], "--max-new-tokens -3"),
    (["--tree", "chainx"], "TOTAL-DEPTH-TOPK"),
    (["--tree", "48-5"], "--tree 48-5"),
    (["--tree", "10-5-1"], "--tree 10-5-1"),
    (["--tree", "48-5-5000"], "top-k 5000 exceeds the target's vocabulary of 300"),
    (["--mode", "pruned_visual", "--keep-fraction", "0"], "--keep-fraction 0.0: must be in (0, 1]"),
    (["--mode", "pruned_visual", "--keep-fraction", "1.5"], "--keep-fraction 1.5"),
    (["--keep-fraction", "0.5"], "applies to --mode pruned_visual only"),
    (["--top-k", "5000", "--temperature", "1"], "--top-k 5000: exceeds the target's vocabulary"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--fps", "0"], "--fps 0.0: must be positive"),
    (["--max-visual-tokens", "0"], "--max-visual-tokens 0"),
    (["--min-pixels", "5000", "--max-pixels", "100"], "--min-pixels 5000 is above --max-pixels 100"),
    (["--m-star", "0"], "--m-star 0"),
    (["--m-star", "3"], "--m-star 3: must be inside the target's decoder stack (1..2)"),
    (["--repeats", "0", "--compare-ar"], "--repeats 0"),
    (["--jsonl", "/missing_dir/out.jsonl"], "--jsonl /missing_dir/out.jsonl: directory /missing_dir does not exist"),
]


@pytest.mark.parametrize("argv,expect", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_refused_before_any_model(files, capsys, no_model, argv, expect):
    d, cfg, video = files
    code, msg = error_of(["--config", str(cfg), "--video", str(video), *argv], capsys)
    assert code == 2 and expect in msg, msg


def test_jsonl_into_a_directory_or_readonly_file_is_refused(files, capsys, no_model, tmp_path):
    d, cfg, video = files
    code, msg = error_of(["--config", str(cfg), "--jsonl", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in msg
    ro = tmp_path / "ro.jsonl"
    ro.write_text("")
    ro.chmod(0o444)
    import os

    if os.access(ro, os.W_OK):  # root ignores permissions
        pytest.skip("running as root: read-only files are writable")
    code, msg = error_of(["--config", str(cfg), "--jsonl", str(ro)], capsys)
    assert code == 2 and "not writable" in msg


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt"])
def test_bad_input_files_are_refused_before_any_model(files, capsys, no_model, tmp_path, kind):
    d, cfg, video = files
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        data = Path(video).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    code, msg = error_of(["--config", str(cfg), "--video", str(video), "--video", str(path)], capsys)
    assert code == 1 and f"{kind}.mp4" in msg, msg


def test_bad_target_config_is_one_line(files, capsys, no_model, tmp_path):
    d, cfg, video = files
    bad = json.loads(cfg.read_text())
    del bad["vision_config"]["depth"]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    code, msg = error_of(["--config", str(p), "--video", str(video)], capsys)
    assert code == 1 and "bad.json" in msg and "depth" in msg


def test_engine_refusals_reach_the_user_as_one_line(files, capsys, monkeypatch):
    """Whatever engine.prepare refuses (its messages are clear) ends as one line, exit 1, no traceback."""
    from sparrow_jax.decoding import engine as E

    def refuse(*a, **k):
        raise ValueError("tree 10-3-3: something the engine refuses\nover two lines")

    monkeypatch.setattr(E, "prepare", refuse)
    d, cfg, video = files
    code, msg = error_of(["--config", str(cfg), "--video", str(video), "--max-pixels", str(56 * 56),
                          "--max-new-tokens", "2", "--tree", "10-3-3"], capsys)
    assert code == 1 and "something the engine refuses over two lines" in msg


# ------------------------------------------------------------------ preprocessing from the checkpoint


def _jit_logits(model, batch):
    """The target's logits over a prefill batch (one compiled forward)."""
    import jax
    from flax import nnx

    from sparrow_jax.models import target as tg

    graphdef, params = nnx.split(model)

    def fwd(params, batch):
        m = nnx.merge(graphdef, params)
        h, _, _ = tg.forward(m, batch)
        return m.logits(h)

    return np.asarray(jax.jit(fwd)(params, batch))


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    """A transformers-written Qwen2.5-VL with patch 8, temporal patch 1 and spatial merge 1 (each was a
    crash: patch 14 / merge 2 were assumed), its preprocessor_config.json written by transformers' image
    processor, and a video_preprocessor_config.json asking for 1 fps and 64x64-pixel frames."""
    pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    d = tmp_path_factory.mktemp("odd_ckpt")
    cfg = _tiny.hf_config_dict(vision={"patch_size": 8, "temporal_patch_size": 1, "spatial_merge_size": 1,
                                       "window_size": 32})
    _tiny.save_hf_checkpoint(d, cfg, seed=3)
    mod.Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=1, merge_size=1, min_pixels=32 * 32,
                                 max_pixels=64 * 64).save_pretrained(d)
    (d / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 8, "temporal_patch_size": 1, "merge_size": 1,
        "size": {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}, "fps": 1.0, "do_sample_frames": True}))
    return d


def test_preprocessing_follows_a_transformers_checkpoint(files, odd_checkpoint, capsys, tmp_path):
    """decode.py on the odd checkpoint: frames of 64x64 at 1 fps by 8-pixel patches, no merge, one frame per
    temporal step; its prefill logits equal transformers' on the same inputs."""
    import torch

    from sparrow_jax.io.hf_checkpoint import load_qwen2_5_vl
    from sparrow_jax.io.text import load_codec
    from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch
    from transformers import Qwen2_5_VLForConditionalGeneration

    d, _, video = files  # 8 frames at 4 fps = 2 s
    out = tmp_path / "out.jsonl"
    decode.main(["--target", str(odd_checkpoint), "--video", str(video), "--prompt", "What moves?", "--mode", "ar",
                 "--max-new-tokens", "3", "--no-stream", "--jsonl", str(out)])
    printed = capsys.readouterr().out
    assert "56x56 -> 64x64" in printed  # the video processor's 64x64 frames
    row = json.loads(out.read_text())
    assert row["visual_tokens"] == 4 * 8 * 8  # 2 s at 1 fps -> min_frames 4, one frame per step, 8x8 patches
    # the same inputs through transformers: equal logits
    args = decode.parse_args(["--target", str(odd_checkpoint), "--video", str(video), "--prompt", "What moves?"])
    model = load_qwen2_5_vl(odd_checkpoint)
    processor = api.Processor(model.cfg, model_dir=odd_checkpoint, codec=load_codec(None, model.cfg.text.vocab_size))
    _, (prompt,) = decode.build_prompts(args, processor)
    (vis,) = prompt.visuals
    assert vis.grid_thw == (4, 8, 8) and vis.pixel_values.shape[1] == 3 * 1 * 8 * 8
    ours = _jit_logits(model, prepare_prefill_batch([prompt], model.cfg))[0, :len(prompt.input_ids)]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(odd_checkpoint).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(prompt.input_ids[None], dtype=torch.long),
                 mm_token_type_ids=torch.tensor(prompt.mm_token_type_ids[None], dtype=torch.long),
                 pixel_values_videos=torch.tensor(vis.pixel_values), video_grid_thw=torch.tensor([vis.grid_thw]),
                 second_per_grid_ts=torch.tensor([vis.second_per_grid_t])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert row["tokens"][0] == int(np.argmax(ref[-1]))


def test_preprocessor_json_contradicting_the_checkpoint_is_refused(files, odd_checkpoint, capsys, tmp_path):
    import shutil

    d, _, video = files
    ckpt = tmp_path / "ckpt"
    shutil.copytree(odd_checkpoint, ckpt)
    js = json.loads((ckpt / "video_preprocessor_config.json").read_text())
    (ckpt / "video_preprocessor_config.json").write_text(json.dumps({**js, "patch_size": 14}))
    code, msg = error_of(["--target", str(ckpt), "--video", str(video), "--mode", "ar"], capsys)
    assert code == 1 and "video_preprocessor_config.json: patch_size 14 does not match" in msg


# ------------------------------------------------------------------------- training under faults


def _train_cfg(d, out, **kw):
    from sparrow_jax.training.trainer import TrainConfig

    over = {"target_config": d / "target.json", "target_seed": 7, "features": d / "features", "out_dir": out,
            "max_text": 32, "max_visual": 16, "m_star": 1, "global_batch": 4, "steps": 4, "save_every": 2,
            "log_every": 1, "tensorboard": "false", "mtp_steps": 1, "lr": 0.003, **kw}
    return TrainConfig.from_file_and_overrides(None, [f"{k}={v}" for k, v in over.items()])


def _flat(params):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def base_run(small_target, tmp_path_factory):
    """An uninterrupted 4-step draft run (checkpoints at steps 2 and 4, both sealed) and its final params."""
    from sparrow_jax.synthetic.samples import synthetic_samples
    from sparrow_jax.training.features import FeatureSpec, extract_features
    from sparrow_jax.training.trainer import Trainer

    d = tmp_path_factory.mktemp("train_faults")
    (d / "target.json").write_text(json.dumps(_tiny.SMALL_VOCAB_CONFIG))
    samples = synthetic_samples(small_target.cfg, 16, seed=2, text_vocab=_tiny.SMALL_TEXT_VOCAB)
    extract_features(small_target, samples, d / "features", spec=FeatureSpec(m_star=1), shard_size=16, progress=False)
    tr = Trainer(_train_cfg(d, d / "base"), target=small_target)
    tr.run(progress=False)
    return d, _flat(tr.params)


def _damage(step_dir: Path, kind: str):
    """Damage one step's files the ways a disk, a copy or a kill does."""
    import os

    data = max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    if kind.endswith("unsealed"):
        os.remove(step_dir / "sparrow_checksums.json")
    if kind.startswith("truncated data"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind.startswith("emptied manifest"):
        (step_dir / "state" / "manifest.ocdbt").write_bytes(b"")
    elif kind.startswith("truncated metadata"):
        m = step_dir / "meta" / "metadata"
        m.write_text(m.read_text()[:40])
    elif kind.startswith("flipped bit"):
        b = bytearray(data.read_bytes())
        b[len(b) // 2] ^= 0x10
        data.write_bytes(bytes(b))
    elif kind.startswith("64 inverted bytes"):
        b = bytearray(data.read_bytes())
        for i in range(64):
            b[len(b) // 3 + i] ^= 0xFF
        data.write_bytes(bytes(b))
    return data.relative_to(step_dir)


# (damage, what the one-line report names); "unsealed": the step's file checksums were never written
# (a kill right after its commit), so the state fingerprint or the failing file must catch it. Where the
# damage may land in a compressed chunk's header or in its values (the byte layout of an OCDBT data file
# varies from run to run), either report is right: alternatives are separated by "|".
DAMAGE = [("truncated data file", "{data}: "), ("truncated data file, unsealed", "unreadable"),
          ("emptied manifest, unsealed", "state/manifest.ocdbt: empty file"),
          ("truncated metadata JSON", "meta/metadata: "),
          ("truncated metadata JSON, unsealed", "meta/metadata: not valid JSON"),
          ("flipped bit", "{data}: contents differ from the checksum"),
          ("flipped bit, unsealed", "values differ from the checksum saved with the checkpoint"),
          ("64 inverted bytes, unsealed", "values differ from the checksum saved with the checkpoint|unreadable")]


def _damaged_run(d, tmp_path, kind):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(d / "base", out)
    return out, _damage(out / "checkpoints" / "4", kind)


@pytest.mark.parametrize("kind,names", DAMAGE, ids=[k for k, _ in DAMAGE])
def test_damaged_newest_checkpoint_is_named_and_skipped(small_target, base_run, tmp_path, kind, names):
    """One line names the step and the damaged file (or array); the step is moved aside and the newest
    step that verifies is restored."""
    from sparrow_jax.training.trainer import Trainer

    d, _ = base_run
    out, data = _damaged_run(d, tmp_path, kind)
    logs = []
    tr = Trainer(_train_cfg(d, out), target=small_target, log=logs.append)
    assert tr.restore_latest() and tr.step == 2
    report = next(x for x in logs if "is damaged" in x)
    assert report.startswith("[train] checkpoint step 4 is damaged: "), logs
    assert any(alt.format(data=data) in report for alt in names.split("|")), logs
    assert "\n" not in report and logs[-1] == "[train] resuming from step 2, the newest checkpoint that verifies"
    assert (out / "damaged_checkpoints" / "4").is_dir() and not (out / "checkpoints" / "4").exists()


def test_resume_past_a_flipped_bit_is_bit_identical(small_target, base_run, tmp_path):
    """A bit flipped in the newest checkpoint's data: resumed from step 2, the run ends bit-identical to
    the uninterrupted one, with one metrics line per step (the re-run steps are not repeated)."""
    from sparrow_jax.training.trainer import Trainer

    d, final = base_run
    out, _ = _damaged_run(d, tmp_path, "flipped bit")
    tr = Trainer(_train_cfg(d, out), target=small_target, log=lambda *_: None)
    tr.run(progress=False)
    got = _flat(tr.params)
    for k in final:
        np.testing.assert_array_equal(got[k], final[k], err_msg=k)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps


def test_no_checkpoint_verifies_refuses_with_the_recovery_command(small_target, base_run, tmp_path, capsys):
    import shutil

    import train

    d, _ = base_run
    out = tmp_path / "run"
    shutil.copytree(d / "base", out)
    for step in ("2", "4"):
        _damage(out / "checkpoints" / step, "emptied manifest")
    with pytest.raises(SystemExit) as e:
        train.main(["--no-progress"] + [a for k, v in {"target_config": d / "target.json", "features": d / "features",
                                                       "out_dir": out, "max_text": 32, "max_visual": 16, "m_star": 1,
                                                       "global_batch": 4, "steps": 6, "tensorboard": "false"}.items()
                                        for a in ("--set", f"{k}={v}")])
    msg = str(e.value)
    assert msg.startswith("train.py: error: no checkpoint in") and "\n" not in msg
    assert f"mv {out.resolve() / 'checkpoints'} {out.resolve() / 'checkpoints.damaged'}" in msg
    assert "step 4 is damaged: state/manifest.ocdbt" in capsys.readouterr().out


def test_non_finite_loss_stops_before_any_save_and_export_is_refused(small_target, base_run, tmp_path):
    import jax

    from sparrow_jax.training.checkpoint_guard import NonFiniteError
    from sparrow_jax.training.trainer import Trainer

    d, _ = base_run
    out = tmp_path / "run"
    tr = Trainer(_train_cfg(d, out, steps=6), target=small_target, log=lambda *_: None)
    tr.run(steps=2, progress=False)  # a good checkpoint at step 2
    tr.params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), tr.params)  # a poisoned update
    with pytest.raises(NonFiniteError, match=r"step 3: loss nan.*the last checkpoint is step 2"):
        tr.run(progress=False, resume=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"], "nothing saved after the NaN"
    with pytest.raises(ValueError, match="draft: .* hold NaN/Inf .* refusing to export"):
        tr.check_finite_params("draft")


# ----------------------------------------------------------------------------------- config errors


def test_every_transformers_activation_we_accept_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.activations import ACT2FN

    from sparrow_jax.models.layers import ACTIVATIONS

    x = np.linspace(-12, 12, 2001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(x)), ref, atol=2e-6, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("where,key,value,expect", [
    ("text_config", "hidden_act", "gelu_newest", "text_config.hidden_act 'gelu_newest' is not a supported activation"),
    ("vision_config", "hidden_act", "swishy", "vision_config.hidden_act 'swishy'"),
    ("text_config", "hidden_size", "64", "text_config.hidden_size '64' must be an integer"),
    ("vision_config", "patch_size", 14.5, "vision_config.patch_size 14.5 must be an integer"),
    ("text_config", "num_attention_heads", 5, "hidden_size 64, heads 5, kv heads 2 do not divide"),
])
def test_config_errors_name_the_file_and_key(tmp_path, capsys, no_model, where, key, value, expect):
    d = json.loads(json.dumps(_tiny.BASE_HF_CONFIG))
    d[where][key] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(registry.ConfigError) as e:
        registry.config_from_dict(*registry.read_config_dict(tmp_path))
    assert str(e.value).startswith(str(tmp_path / "config.json")) and expect in str(e.value), str(e.value)
    code, msg = error_of(["--config", str(tmp_path / "config.json"), "--mode", "ar"], capsys)
    assert code == 1 and expect in msg


def test_gelu_new_target_builds_and_matches_transformers(tmp_path):
    """hidden_act gelu_new (the tanh GELU transformers accepts for Qwen2): loads, logits equal transformers'."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sparrow_jax.io.hf_checkpoint import load_qwen2_5_vl
    from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch

    _tiny.save_hf_checkpoint(tmp_path, _tiny.hf_config_dict(text={"hidden_act": "gelu_new"},
                                                             vision={"hidden_act": "gelu_pytorch_tanh"}), seed=1)
    model = registry.load_target(tmp_path)
    assert isinstance(model, type(load_qwen2_5_vl(tmp_path))) and model.cfg.text.hidden_act == "gelu_new"
    rng = np.random.default_rng(0)
    p = _tiny.prompt([_tiny.random_text(rng, 5), _tiny.visual(rng, (2, 4, 4)), _tiny.random_text(rng, 4)])
    ours = _jit_logits(model, prepare_prefill_batch([p], model.cfg))[0, :len(p.input_ids)]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    (vis,) = p.visuals
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(p.input_ids[None], dtype=torch.long),
                 mm_token_type_ids=torch.tensor(p.mm_token_type_ids[None], dtype=torch.long),
                 pixel_values_videos=torch.tensor(vis.pixel_values), video_grid_thw=torch.tensor([vis.grid_thw]),
                 second_per_grid_ts=torch.tensor([vis.second_per_grid_t])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
