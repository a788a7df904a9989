"""The public Python API (issue 12 §7) on the shipped tiny target and its Sparrow draft: a decoder loaded
once generates again without compiling anything for new sampling settings or seeds; rows of a batch equal
single-row calls; Sparrow's greedy output equals AR's; the README's example runs and gives decode.py's AR
tokens; the DecodeConfig a JSON line records rebuilds the run."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import _tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import decode  # noqa: E402
import sparrow_jax  # noqa: E402
from sparrow_jax import DecodeConfig, SamplingParams, SpecDecoder, VisionOptions, runtime  # noqa: E402
from sparrow_jax.api import DecodeConfigError  # noqa: E402
from sparrow_jax.decoding import engine as E  # noqa: E402
from sparrow_jax.decoding.autoregressive import ar_loop  # noqa: E402
from sparrow_jax.models import target as tg  # noqa: E402

TARGET, DRAFT = ROOT / "shipped" / "tiny-qwen2.5-vl", ROOT / "shipped" / "drafts" / "sparrow"
QUESTIONS = ["Describe the video in detail.", "What colour is the background of this video?"]
MAX_NEW = 16  # as the README's example: the compiled programs are shared (max_new_tokens is static)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 2 s, 56 px clip: 32 visual tokens at the shipped target's 112 px, 2 fps."""
    return str(_tiny.write_cli_files(tmp_path_factory.mktemp("api"))[1])


@pytest.fixture(scope="module")
def decoder():
    return SpecDecoder.from_pretrained(TARGET, draft_dir=DRAFT)


@contextlib.contextmanager
def backend_compiles():
    """Every XLA compilation inside the block (jax's compile event), by anything."""
    events = []

    def listener(event, duration_s, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


JITTED = (tg._prefill, tg._encode_chunk, E.draft_prefill, E.speculative_loop, ar_loop)  # prefill: a host wrapper over the first two


@pytest.mark.parametrize("mode", ["sparrow", "ar"])
def test_new_sampling_settings_and_seeds_compile_nothing(decoder, clip, mode):
    """One model load, one warm-up call; then calls with other temperatures / top-p / top-k, per-row
    settings and seeds run without a single XLA compilation (sampling values are traced arrays)."""
    kw = dict(videos=[clip, clip], max_new_tokens=MAX_NEW, mode=mode)
    decoder.generate(QUESTIONS, sampling=SamplingParams(0.8, top_p=0.9), seed=1, **kw)
    sizes = [f._cache_size() for f in JITTED]
    settings = [SamplingParams(1.3, top_k=5), (SamplingParams(0.5), SamplingParams(1.0, top_p=0.5, top_k=3))]
    with backend_compiles() as events:
        outs = [decoder.generate(QUESTIONS, sampling=s, seed=seed, **kw) for seed, s in enumerate(settings, 2)]
    assert events == [], f"{len(events)} compilation(s) for new sampling values"
    with backend_compiles() as probe:  # the listener does see a compilation
        jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(7))
    assert probe
    assert [f._cache_size() for f in JITTED] == sizes
    # each row's record names its own setting
    assert outs[0][1].metrics["temperature"] == 1.3 and outs[0][1].metrics["top_k"] == 5
    assert outs[1][0].metrics["top_k"] == 0 and outs[1][1].metrics["top_p"] == 0.5
    assert all(len(o.token_ids) >= 1 and o.metrics["mode"] == mode for out in outs for o in out)


def test_batch_rows_equal_single_row_calls(decoder, clip):
    """Rows of different prompt lengths in one batch: each row's text and tokens equal its own call."""
    batch = decoder.generate(QUESTIONS, videos=[clip, clip], max_new_tokens=MAX_NEW)
    singles = [decoder.generate([q], videos=[clip], max_new_tokens=MAX_NEW)[0] for q in QUESTIONS]
    assert batch[0].metrics["prompt_tokens"] != batch[1].metrics["prompt_tokens"]
    assert [o.token_ids for o in batch] == [o.token_ids for o in singles]
    assert [o.text for o in batch] == [o.text for o in singles] and all(o.text for o in batch)
    assert [o.metrics["row"] for o in batch] == [0, 1] and batch[0].metrics["batch"] == 2
    assert singles[0].metrics["batch"] == 1 and batch[0].metrics["visual_tokens"] == 32


def test_sparrow_output_is_the_targets_greedy_output(decoder, clip):
    spec = decoder.generate(QUESTIONS, videos=[clip, clip], max_new_tokens=MAX_NEW)
    ar = decoder.generate(QUESTIONS, videos=[clip, clip], max_new_tokens=MAX_NEW, mode="ar")
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]
    m = spec[0].metrics
    assert m["mode"] == "sparrow" and m["draft"] == str(DRAFT) and m["config"]["tree"] == "auto" and m["tree"]
    assert m["tau"] > 1.0, "the shipped draft is accepted: more than one token per verify round"
    assert ar[0].metrics["tree"] is None and "tau" not in ar[0].metrics
    # the timings say whether XLA:CPU's workers ran pinned (sparrow_jax.runtime; on by default on the CPU)
    assert m["cpu_workers_pinned"] == decoder.cpu_workers_pinned
    if runtime.pin_enabled() and jax.default_backend() == "cpu" and len(os.sched_getaffinity(os.getpid())) > 1:
        assert m["cpu_workers_pinned"] == len(runtime.cpu_worker_threads()) > 0


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_gives_decode_py_ar_tokens(clip, tmp_path, monkeypatch):
    """The README's example, as written (in a directory with the shipped models and a clip.mp4), then
    decode.py's AR path on the same input: the same tokens; its JSON line's config rebuilds the run."""
    code = readme_example()
    assert len([x for x in code.splitlines() if x.strip() and not x.startswith(("from ", "import "))]) == 5
    (tmp_path / "shipped").symlink_to(ROOT / "shipped")
    (tmp_path / "clip.mp4").symlink_to(clip)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 — the README's own code
    out = ns["out"]
    assert out.token_ids and out.metrics["tau"] >= 1.0
    jsonl = tmp_path / "ar.jsonl"
    argv = ["--target", str(TARGET), "--draft", str(DRAFT), "--mode", "ar", "--video", "clip.mp4", "--prompt",
            out.metrics["prompt"], "--max-new-tokens", str(out.metrics["config"]["max_new_tokens"]), "--no-stream",
            "--jsonl", str(jsonl)]
    decode.main(argv)
    (row,) = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert row["tokens"] == out.token_ids and row["text"] == out.text
    # One DecodeConfig: the flags build it, it runs, the line records it, and it reruns the same decode.
    config = DecodeConfig.from_dict(row["config"])
    assert config == decode.decode_config(decode.parse_args(argv)) and config.mode == "ar"
    assert ns["decoder"].generate([row["prompt"]], videos=["clip.mp4"], config=config)[0].token_ids == row["tokens"]


def test_bad_inputs_and_settings_are_clear_errors(decoder, clip):
    with pytest.raises(ValueError, match="videos: 1 given for 2 prompt"):
        decoder.generate(QUESTIONS, videos=[clip])
    with pytest.raises(ValueError, match="row 0: both a video and an image"):
        decoder.generate(QUESTIONS[:1], videos=[clip], images=[clip])
    with pytest.raises(TypeError, match="unknown decode setting.*'temprature'"):
        decoder.generate(QUESTIONS[:1], temprature=0.7)
    with pytest.raises(ValueError, match="sampling: 3 per-row settings for 2 prompt"):
        decoder.generate(QUESTIONS, sampling=[SamplingParams()] * 3)
    with pytest.raises(DecodeConfigError, match="top_k 5000: exceeds the target's vocabulary of 1024"):
        decoder.generate(QUESTIONS[:1], sampling=SamplingParams(1.0, top_k=5000))
    with pytest.raises(DecodeConfigError, match="tree 48-5: expected TOTAL-DEPTH-TOPK"):
        DecodeConfig(tree="48-5")
    with pytest.raises(DecodeConfigError, match="keep_fraction applies to mode pruned_visual only"):
        DecodeConfig(keep_fraction=0.5)
    with pytest.raises(DecodeConfigError, match="max_visual_tokens 0: must be positive"):
        DecodeConfig(vision=VisionOptions(max_visual_tokens=0))
    with pytest.raises(DecodeConfigError, match="mode 'spec'"):
        DecodeConfig(mode="spec")


def test_package_import_is_light_and_names_are_public():
    """`import sparrow_jax` loads no JAX (decode.py --help stays fast); the public names resolve lazily."""
    code = "import sys, sparrow_jax; assert 'jax' not in sys.modules; print(sorted(sparrow_jax.__all__))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "SpecDecoder" in res.stdout and "DecodeConfig" in res.stdout
    assert all(getattr(sparrow_jax, n).__module__ in ("sparrow_jax.api", "sparrow_jax.decoding.sampling")
               for n in sparrow_jax.__all__)
