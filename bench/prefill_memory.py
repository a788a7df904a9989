"""Peak memory and time of one long-video prefill, three ways (`--source`):

* `random`: a random target from a config (default configs/tiny.json) on random, already patchified pixels
  of the requested number of visual tokens; `target.prefill` once to compile and `--repeats` times to
  time it. Measures the model, not the inputs.
* `video`: decode.py's own path, stage by stage, in this process: a held-out world scene of the length
  that gives `--visual-tokens` (rendered to an H.264 mp4 in a child process, cached in `--video-dir`),
  read and preprocessed by decode.py's `build_prompts` with the target's preprocessor configs, the target
  loaded, the batch built (`registry.prepare_batch_for`), `target.prefill` (first call: compile included),
  then a few AR tokens. Each stage reports its own peak RSS (VmHWM reset at the stage start), the RSS it
  leaves behind, its wall time and its CPU time (on a shared machine only the latter compares).
* `decode`: `decode.py` itself in a child process on the same video (`--mode ar`, a few new tokens, no
  streaming): the child's peak RSS (the number a user sees), and its RSS when each `[decode]` line appeared.

Peak RSS is the whole process's high-water mark (jax runtime, compile and all). `--rss-limit-gib` stops a
run that goes past it (this machine is shared): the record then says where it stopped.

  nice -n 19 python bench/prefill_memory.py --source video --visual-tokens 16384
  nice -n 19 python bench/prefill_memory.py --source decode --visual-tokens 55296
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (environment, peak_rss_gib, reset_peak_rss, rss_gib, window_peak_rss_gib,  # noqa: E402
                    write_jsonl)

SHIPPED = ROOT / "shipped" / "tiny-qwen2.5-vl"
QUESTION = "Describe the video in detail."


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["random", "video", "decode"], default="random")
    ap.add_argument("--visual-tokens", type=int, default=16384, help="merged visual tokens (after 2x2 merge)")
    ap.add_argument("--rss-limit-gib", type=float, default=7.5, help="stop the run past this RSS")
    ap.add_argument("--jsonl", default=str(Path(__file__).resolve().parent / "results" / "prefill_memory.jsonl"))
    r = ap.add_argument_group("--source random")
    r.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"))
    r.add_argument("--frame-side", type=int, default=448, help="frame side in pixels (multiple of 28)")
    r.add_argument("--text-tokens", type=int, default=64)
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    v = ap.add_argument_group("--source video / decode")
    v.add_argument("--target", default=str(SHIPPED), help="target checkpoint directory (with its preprocessor configs)")
    v.add_argument("--video-dir", default=str(Path(tempfile.gettempdir()) / "sparrow_prefill_memory"),
                   help="where rendered world videos are cached")
    v.add_argument("--max-new-tokens", type=int, default=4)
    v.add_argument("--video", help="--source decode: this video file instead of a rendered world scene (its visual "
                   "tokens then follow from the file and the preprocessing; --visual-tokens is ignored)")
    v.add_argument("--random-config", help="--source decode: decode.py --config CONFIG (a random-initialised target "
                   "of that architecture with decode.py's default preprocessing) instead of --target")
    ap.add_argument("--render-only", help=argparse.SUPPRESS)  # child process: render the scene to this path
    args = ap.parse_args(argv)
    if args.visual_tokens <= 0:
        ap.error(f"--visual-tokens {args.visual_tokens}: must be positive")
    if (args.video or args.random_config) and args.source != "decode":
        ap.error("--video and --random-config apply to --source decode")
    return args


def cpu_s() -> float:
    """This process's CPU time (user + system, all threads): comparable across runs on a shared machine,
    where wall time is not."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RssGuard:
    """Polls this process's (or a child's) RSS; past `limit_gib` calls `on_limit(rss)`."""

    def __init__(self, limit_gib: float, on_limit, pid="self", every_s: float = 0.05):
        self.limit, self.on_limit, self.pid, self.every = limit_gib, on_limit, pid, every_s
        self.max_seen = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                rss = rss_gib(self.pid)
            except (OSError, KeyError):  # the child is gone
                return
            self.max_seen = max(self.max_seen, rss)
            if rss > self.limit:
                self.on_limit(rss)
                return

    def stop(self):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------ random


def run_random(args) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.models import target as tg  # noqa: PLC0415
    from sparrow_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, prepare_prefill_batch  # noqa: PLC0415

    cfg = Qwen25VLConfig.from_hf_dict(json.loads(Path(args.config).read_text()))
    v = cfg.vision
    side = args.frame_side // (v.patch_size * v.spatial_merge_size) * v.spatial_merge_size  # patches per side
    per_group = (side // v.spatial_merge_size) ** 2
    groups = max(1, args.visual_tokens // per_group)
    grid = (groups, side, side)
    n_vis = groups * per_group
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((groups * side * side, v.patch_dim), dtype=np.float32)
    visual = types.SimpleNamespace(kind="video", pixel_values=pixels, grid_thw=grid, second_per_grid_t=1.0)
    half = args.text_tokens // 2
    text = rng.integers(0, 1000, args.text_tokens).tolist()
    ids = text[:half] + [cfg.vision_start_token_id] + [cfg.video_token_id] * n_vis + [cfg.vision_end_token_id] + text[half:]
    types_ = [0] * (half + 1) + [2] * n_vis + [0] * (1 + args.text_tokens - half)
    prompt = types.SimpleNamespace(input_ids=np.asarray(ids), mm_token_type_ids=np.asarray(types_), visuals=(visual,))
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params = nnx.split(model)
    batch = prepare_prefill_batch([prompt], cfg, dtype=np.float32)
    del pixels, visual, prompt
    T = batch.input_ids_BT.shape[1]
    rss_before = peak_rss_gib()
    m_star = tg.default_m_star(cfg.num_layers)
    run = lambda: tg.prefill(graphdef, params, batch, capacity=T + 256, m_star=m_star)  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return {
        "config": Path(args.config).name, "dtype": args.dtype,
        "visual_tokens": n_vis, "grid_thw": grid, "seq_len": int(T),
        "first_call_s (compile+run)": round(first, 2), "prefill_s": round(min(times), 3) if times else None,
        "peak_rss_gib_before_prefill": round(rss_before, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
    }


# ------------------------------------------------------------------------------------------- video


def world_video(args) -> tuple[Path, int]:
    """The cached mp4 of the held-out demo scene long enough for `--visual-tokens` under the target's own
    video preprocessing (rendered in a child process, so its frames never count here), and its tokens."""
    from sparrow_jax.synthetic import demo  # noqa: PLC0415

    wcfg = demo.world_config(Path(args.target) / "video_preprocessor_config.json")
    seconds = wcfg.duration_for_tokens(args.visual_tokens)
    path = Path(args.video_dir) / f"world_{demo.SAMPLE_SEED}_{wcfg.height}px_{seconds}s.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--render-only", str(path), "--target", args.target,
                        "--visual-tokens", str(args.visual_tokens)], check=True)
    return path, wcfg.visual_tokens(seconds)


def render_only(args) -> None:
    from sparrow_jax.synthetic import demo, world as W  # noqa: PLC0415

    wcfg = demo.world_config(Path(args.target) / "video_preprocessor_config.json")
    scene = W.make_scene(demo.SAMPLE_SEED, wcfg.duration_for_tokens(args.visual_tokens), wcfg)
    tmp = Path(args.render_only).with_suffix(".part.mp4")
    W.write_scene_video(scene, tmp, wcfg)
    tmp.rename(args.render_only)


def decode_argv(args, video: Path) -> list[str]:
    model = ["--config", args.random_config] if args.random_config else ["--target", args.target]
    return [*model, "--video", str(video), "--prompt", QUESTION, "--mode", "ar",
            "--max-new-tokens", str(args.max_new_tokens), "--no-stream", "--no-compare-ar"]


def run_video(args, rec: dict) -> dict:
    """decode.py's path stage by stage (the functions decode.py calls, in its order)."""
    video, n_vis = world_video(args)
    rec.update(video=video.name, visual_tokens_expected=n_vis)
    stages = rec.setdefault("stages", {})
    state = {"stage": "start"}

    def over_limit(rss):
        rec.update(aborted=f"RSS {rss:.2f} GiB passed --rss-limit-gib {args.rss_limit_gib} during stage "
                   f"{state['stage']!r}", peak_rss_gib=round(rss, 2))
        finish(args, rec)
        os._exit(3)

    guard = RssGuard(args.rss_limit_gib, over_limit)

    def stage(name, fn):
        state["stage"] = name
        reset_peak_rss()
        t0, c0 = time.perf_counter(), cpu_s()
        out = fn()
        stages[name] = {"s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu_s() - c0, 2),
                        "peak_rss_gib": round(window_peak_rss_gib(), 3), "rss_after_gib": round(rss_gib(), 3)}
        print(f"[prefill_memory] {name}: {stages[name]}", flush=True)
        return out

    sys.path.insert(0, str(ROOT))
    import decode  # noqa: PLC0415

    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax import api  # noqa: PLC0415
    from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity  # noqa: PLC0415
    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.models import registry, target as tg  # noqa: PLC0415

    dargs = decode.parse_args(decode_argv(args, video))
    cfg = registry.config_from_dict(*registry.read_config_dict(dargs.target))
    codec = load_codec(dargs.target, cfg.text.vocab_size)

    def preprocess():
        return decode.build_prompts(dargs, api.Processor(cfg, model_dir=decode.model_dir(dargs), codec=codec))[1]

    prompts = stage("preprocess (read + resize + patchify)", preprocess)
    model = stage("load target", lambda: registry.load_target(dargs.target))
    tgraph, tparams = nnx.split(model)
    batch = stage("prepare batch", lambda: registry.prepare_batch_for(cfg)(prompts, cfg))
    T = int(batch.input_ids_BT.shape[1])
    rec.update(visual_tokens=int(np.asarray(batch.vis_len_B).sum()), seq_len=T)
    capacity = cache_capacity(T, dargs.max_new_tokens)
    m_star = tg.default_m_star(cfg.num_layers)
    pre = stage("prefill (first call: compile + run)", lambda: jax.block_until_ready(
        tg.prefill(tgraph, tparams, batch, capacity=capacity, m_star=m_star)))
    res = stage("AR decode", lambda: jax.block_until_ready(ar_generate(
        tgraph, tparams, pre.cache, pre.last_logits_BV, pre.rope_delta_B, jax.random.key(0),
        max_new_tokens=dargs.max_new_tokens)))
    guard.stop()
    rec.update(tokens=np.asarray(res.tokens_BM)[0, :int(res.num_tokens_B[0])].tolist(),
               prefill_s=stages["prefill (first call: compile + run)"]["s"],
               peak_rss_gib=max(s["peak_rss_gib"] for s in stages.values()),  # VmHWM is reset per stage
               max_stage=max(stages, key=lambda k: stages[k]["peak_rss_gib"]))
    return rec


def run_decode(args, rec: dict) -> dict:
    """decode.py in a child process: its peak RSS, and its RSS as each `[decode]` line appears."""
    video, n_vis = (Path(args.video), None) if args.video else world_video(args)
    rec.update(video=video.name, visual_tokens_expected=n_vis)
    cmd = [sys.executable, str(ROOT / "decode.py"), *decode_argv(args, video)]
    rec["decode_command"] = shlex.join(["python", "decode.py", *decode_argv(args, video)])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    killed = {}

    def over_limit(rss):
        killed["rss"] = rss
        child.kill()

    guard = RssGuard(args.rss_limit_gib, over_limit, pid=child.pid)
    timeline, lines = [], []
    for line in child.stdout:
        lines.append(line.rstrip())
        if line.startswith("[decode]"):
            try:
                timeline.append({"s": round(time.perf_counter() - t0, 1), "rss_gib": round(rss_gib(child.pid), 3),
                                 "line": line.strip()[:100]})
            except (OSError, KeyError):
                pass
    _, status, usage = os.wait4(child.pid, 0)
    guard.stop()
    rec.update(wall_s=round(time.perf_counter() - t0, 1), peak_rss_gib=round(usage.ru_maxrss / 2**20, 2),
               exit_status=os.waitstatus_to_exitcode(status), rss_timeline=timeline)
    if killed:
        rec["aborted"] = f"child RSS {killed['rss']:.2f} GiB passed --rss-limit-gib {args.rss_limit_gib}"
    elif rec["exit_status"] != 0:
        rec["output_tail"] = lines[-15:]
    for line in lines:
        if "prompt tokens" in line and "visual)" in line:
            rec["prompt_line"] = line.strip()
            rec["visual_tokens"] = int(line.rsplit("tokens, ", 1)[1].split(" visual)")[0])
        if line.startswith("[decode] prompt bucket"):
            rec["prefill_line"] = line.strip()
        if line.startswith("[decode] video "):
            rec["video_line"] = line.strip()
        if line.startswith("[0] ids: "):
            rec["tokens"] = json.loads(line.removeprefix("[0] ids: "))
    return rec


def finish(args, rec: dict) -> None:
    print(json.dumps(rec, indent=2), flush=True)
    write_jsonl(args.jsonl, rec)


def main(argv=None):
    args = parse_args(argv)
    if args.render_only:
        return render_only(args)
    rec = {"bench": "prefill_memory", "source": args.source, **environment(),
           "rss_limit_gib": args.rss_limit_gib}
    if args.source == "random":
        rec.update(run_random(args))
    else:
        rec.update(target=f"random {Path(args.random_config).name}" if args.random_config else Path(args.target).name,
                   max_new_tokens=args.max_new_tokens)
        (run_video if args.source == "video" else run_decode)(args, rec)
    finish(args, rec)
    return rec


if __name__ == "__main__":
    main()
