"""Lowering and compile time of the jitted programs a decode runs, from abstract shapes only (no weights).

The target (and a random draft built for it) exist only as shapes (`nnx.eval_shape`); every input is a
`jax.ShapeDtypeStruct` with the shape and dtype decode.py / sparrow_jax/api.py give it for one video
prompt, and each stage lowers and compiles the very jitted function those call:

  prefill        target.prefill            the AR run's target prefill (video prompt, cache allocation)
  prefill_spec   target.prefill            the speculative run's: the same plus the draft's items
  draft_prefill  engine.draft_prefill      the draft over its text items (Sparrow view "none")
  ar_loop        autoregressive.ar_loop    the AR while_loop (greedy, no streaming)
  spec_loop      engine.speculative_loop   the speculative while_loop (greedy, no streaming, --tree)

Each stage runs in its own fresh process (no shared trace caches; its own peak RSS) and is timed in
three parts: trace (Python -> jaxpr), to_hlo (jaxpr -> StableHLO; trace + to_hlo = `.lower()`) and
compile (`.compile()`: XLA passes + codegen). Wall and CPU seconds (`time.process_time`, all threads of
the process) are recorded: on a shared machine the CPU time is the less disturbed of the two.
--layers N overrides the LM depth (num_hidden_layers) to measure the cost per decoder layer.

  python bench/compile_time.py                                  # both 7B configs, all stages, bf16
  python bench/compile_time.py --config configs/qwen2_5_vl_7b.json --layers 2 4 --stages prefill ar_loop spec_loop
  python bench/compile_time.py --fast                           # configs/tiny.json, a short video (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_rss_gib, write_jsonl  # noqa: E402

from sparrow_jax.decoding import engine as E  # noqa: E402
from sparrow_jax.decoding.autoregressive import ar_loop, cache_capacity  # noqa: E402
from sparrow_jax.decoding.tree import TreeSpec  # noqa: E402
from sparrow_jax.models import registry, views  # noqa: E402
from sparrow_jax.models import target as tg  # noqa: E402
from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: E402
from sparrow_jax.models.kv_cache import KVCache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS_7B = (ROOT / "configs" / "qwen2_5_vl_7b.json", ROOT / "configs" / "llava_ov_7b.json")
TINY = ROOT / "configs" / "tiny.json"
STAGES = ("prefill", "prefill_spec", "draft_prefill", "ar_loop", "spec_loop")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
VIEW = "none"  # the Sparrow draft's view (decode.py --mode sparrow)


# ----------------------------------------------------------------------------------- the inputs


def read_config(path, layers: int | None):
    """The target config of a config.json, its LM depth replaced by `layers` (None: as written)."""
    cfg = registry.config_from_dict(*registry.read_config_dict(path))
    if layers is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers))
    return cfg


def video_prompt(cfg, frames: int, frame_side: int, text_tokens: int):
    """One chat-shaped prompt with one video of `frames` frames (zero pixels: only shapes matter):
    Qwen2.5-VL frames of frame_side² px, LLaVA-OneVision frames at its SigLIP tile size."""
    visual, video_ids = registry.family_of(cfg).blank_video(cfg, frames, frame_side)
    text = np.random.default_rng(0).integers(0, min(1000, cfg.text.vocab_size // 2), text_tokens).tolist()
    half = text_tokens // 2
    ids = text[:half] + video_ids + text[half:]
    kinds = [0] * half + [2 if t == cfg.video_token_id else 0 for t in video_ids] + [0] * (text_tokens - half)
    return types.SimpleNamespace(input_ids=np.asarray(ids, np.int64), mm_token_type_ids=np.asarray(kinds),
                                 visuals=(visual,))


def abstract(tree):
    """Arrays -> ShapeDtypeStructs (None and static fields stay)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything the stages lower against, abstract: the models' graphdefs and parameter shapes, the
    batches of the AR and the speculative run, the prefill outputs both loops start from."""

    cfg: object
    ecfg: E.EngineConfig
    tgraph: object
    tparams: object
    dgraph: object
    dparams: object
    batch_ar: tg.PrefillBatch
    batch_spec: tg.PrefillBatch
    pos_BP: object  # the draft layout's positions and lengths (draft_prefill's inputs)
    len_B: object
    next_pos_B: object
    capacity: int  # target cache (AR and speculative runs alike, api.SpecDecoder.run)
    draft_capacity: int
    m_star: int
    visual_tokens: int


def build_inputs(config, *, layers=None, dtype="bfloat16", frames=32, frame_side=448, text_tokens=32, batch=1,
                 tree="48-5-10", max_new_tokens=128, impl="xla") -> Inputs:
    """Abstract models and inputs as api.SpecDecoder.run / engine.prepare build them (B identical rows)."""
    cfg = read_config(config, layers)
    dt = DTYPES[dtype]
    target = nnx.eval_shape(lambda: registry.build_target(cfg, rngs=nnx.Rngs(0), dtype=dt))
    draft = nnx.eval_shape(lambda: SparrowDraft(DraftConfig.for_target(cfg, visual_view=VIEW), rngs=nnx.Rngs(1),
                                                dtype=dt))
    tgraph, tparams = nnx.split(target)
    dgraph, dparams = nnx.split(draft)
    ecfg = E.EngineConfig(tree=TreeSpec.parse(tree), max_new_tokens=max_new_tokens,
                          eos_ids=tuple(cfg.eos_token_ids), impl=impl)
    prompts = [video_prompt(cfg, frames, frame_side, text_tokens)] * batch
    host = registry.prepare_batch_for(cfg)(prompts, cfg)
    lay = E.draft_layout(prompts, VIEW)
    # engine.prepare's batch of a speculative run: the draft's items in its view
    spec = dataclasses.replace(host, draft_idx_BP=lay.idx_BP, draft_len_B=lay.len_B, draft_keep_vis_B=lay.keep_vis_B,
                               draft_by_attention=lay.by_attention, draft_visual_state=views.visual_state(VIEW))
    T = host.input_ids_BT.shape[1]
    return Inputs(cfg, ecfg, tgraph, tparams, dgraph, dparams, abstract(host), abstract(spec), abstract(lay.pos_BP),
                  abstract(lay.len_B), abstract(lay.next_pos_B), cache_capacity(T, max_new_tokens, ecfg.cache_slack),
                  cache_capacity(lay.idx_BP.shape[1], max_new_tokens, ecfg.cache_slack),
                  tg.default_m_star(cfg.num_layers), int(np.asarray(host.vis_len_B)[0]))


def loop_inputs(inp: Inputs) -> dict:
    """Abstract prefill results the loops start from (target.prefill's and engine.draft_prefill's
    output shapes): target and draft caches, last logits / hidden state, rope delta, the PRNG key."""
    cfg, B = inp.cfg, inp.batch_ar.lengths_B.shape[0]
    t, d = cfg.text, DraftConfig.for_target(cfg, visual_view=VIEW)
    dt = jax.tree.leaves(inp.tparams)[0].dtype
    tcache = jax.eval_shape(lambda: KVCache.empty(t.num_hidden_layers, B, inp.capacity, t.num_key_value_heads,
                                                  t.head_dim, dt))
    dcache = jax.eval_shape(lambda: dataclasses.replace(
        KVCache.empty(d.num_layers, B, inp.draft_capacity, d.num_key_value_heads, d.head_dim, dt),
        pos_offset_B=jnp.zeros((B,), jnp.int32)))
    return dict(tcache=tcache, dcache=dcache, last_logits_BV=jax.ShapeDtypeStruct((B, t.vocab_size), jnp.float32),
                last_hidden_BD=jax.ShapeDtypeStruct((B, t.hidden_size), dt), rope_delta_B=inp.batch_ar.rope_delta_B,
                key=jax.eval_shape(lambda: jax.random.key(0)))


def stage_call(stage: str, inp: Inputs):
    """(jitted function, args, kwargs) of a stage: the call decode.py makes, on abstract inputs."""
    impl = inp.ecfg.impl
    if stage in ("prefill", "prefill_spec"):
        b = inp.batch_ar if stage == "prefill" else inp.batch_spec
        # The one-call prefill (tower inside the jitted program): `tg.prefill` is now a host wrapper that runs
        # the tower in chunks first (a separate, smaller compile per chunk shape), which abstract inputs
        # cannot drive; the BENCHMARKS figures were taken before that split.
        return tg._prefill, (inp.tgraph, inp.tparams, b), dict(capacity=inp.capacity, m_star=inp.m_star, impl=impl)
    B, P = inp.batch_spec.draft_idx_BP.shape
    D, dt = inp.cfg.text.hidden_size, jax.tree.leaves(inp.tparams)[0].dtype
    if stage == "draft_prefill":  # target.prefill's draft_e_BPD, draft_hprev_BPD, draft_text_BP
        e = jax.ShapeDtypeStruct((B, P, D), dt)
        return E.draft_prefill, (inp.dgraph, inp.dparams, e, e, jax.ShapeDtypeStruct((B, P), jnp.bool_), inp.pos_BP,
                                 inp.len_B, inp.next_pos_B), dict(capacity=inp.draft_capacity, impl=impl)
    x = loop_inputs(inp)
    if stage == "ar_loop":
        return ar_loop, (inp.tgraph, inp.tparams, x["tcache"], x["last_logits_BV"], x["rope_delta_B"], x["key"]), dict(
            max_new_tokens=inp.ecfg.max_new_tokens, eos_ids=inp.ecfg.eos_ids, impl=impl)
    if stage == "spec_loop":
        return E.speculative_loop, (inp.tgraph, inp.tparams, inp.dgraph, inp.dparams, x["tcache"], x["dcache"],
                                    x["last_logits_BV"], x["last_hidden_BD"], x["rope_delta_B"], x["key"]), dict(
            cfg=inp.ecfg)
    raise ValueError(f"stage {stage!r}: expected one of {list(STAGES)}")


# ----------------------------------------------------------------------------------- measuring


def timed(fn):
    """(result, wall s, CPU s of this process — all its threads)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(stage: str, inp: Inputs) -> dict:
    """Trace, lower and compile one stage; seconds (wall and CPU), program size, RSS."""
    fn, args, kw = stage_call(stage, inp)
    rss_before = peak_rss_gib()
    traced, trace_s, trace_cpu = timed(lambda: fn.trace(*args, **kw))
    lowered, hlo_s, hlo_cpu = timed(traced.lower)
    rss_lowered = peak_rss_gib()
    compiled, compile_s, compile_cpu = timed(lowered.compile)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"trace_s": trace_s, "to_hlo_s": hlo_s, "lower_s": trace_s + hlo_s, "compile_s": compile_s,
            "trace_cpu_s": trace_cpu, "to_hlo_cpu_s": hlo_cpu, "lower_cpu_s": trace_cpu + hlo_cpu,
            "compile_cpu_s": compile_cpu, "stablehlo_lines": lowered.as_text().count("\n"),
            "optimized_hlo_lines": compiled.as_text().count("\n"),
            "jaxpr_eqns": len(traced.jaxpr.eqns),  # top level only: a while_loop counts as one
            "peak_rss_gib_before": rss_before,
            "peak_rss_gib_lowered": rss_lowered, "peak_rss_gib": ru.ru_maxrss / 2**20,
            "voluntary_ctx_switches": ru.ru_nvcsw, "involuntary_ctx_switches": ru.ru_nivcsw}


def run_stage(args) -> dict:
    """One stage in this process (the worker side of `main`)."""
    jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would time nothing
    load = os.getloadavg()
    t0 = time.perf_counter()
    inp = build_inputs(args.config, layers=args.layers, dtype=args.dtype, frames=args.frames,
                       frame_side=args.frame_side, text_tokens=args.text_tokens, batch=args.batch, tree=args.tree,
                       max_new_tokens=args.max_new_tokens, impl=args.attention)
    setup_s = time.perf_counter() - t0
    cfg = inp.cfg
    rec = {"stage": args.stage, "config": Path(args.config).name, "family": cfg.family, "layers": cfg.num_layers,
           "dtype": args.dtype, "batch": args.batch, "visual_tokens": inp.visual_tokens,
           "prompt_bucket": int(inp.batch_ar.input_ids_BT.shape[1]), "target_cache": inp.capacity,
           "draft_cache": inp.draft_capacity, "max_new_tokens": args.max_new_tokens,
           "tree": args.tree if args.stage in ("spec_loop", "prefill_spec", "draft_prefill") else None,
           "attention": args.attention, "setup_s": setup_s, "nice": os.nice(0), "loadavg_1m_at_start": load[0],
           "xla_flags": os.environ.get("XLA_FLAGS")}
    rec.update(measure(args.stage, inp))
    return rec


def worker_argv(args, config, layers, stage, out) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--config", str(config),
            "--record-out", str(out), "--dtype", args.dtype, "--frames", str(args.frames), "--frame-side",
            str(args.frame_side), "--text-tokens", str(args.text_tokens), "--batch", str(args.batch), "--tree",
            args.tree, "--max-new-tokens", str(args.max_new_tokens), "--attention", args.attention]
    return argv + (["--layers", str(layers)] if layers is not None else [])


def table(records) -> str:
    """The printed table: one row per (config, layers, stage)."""
    head = ("| config | LM layers | stage | lower s (CPU s) | compile s (CPU s) | lower+compile s | StableHLO lines "
            "| peak RSS GiB |\n|---|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for r in records:
        if r.get("timed_out"):
            rows.append(f"| {r['config']} | {r['layers']} | {r['stage']} | timed out after {r['timeout_s']} s "
                        "| | | | |")
            continue
        rows.append(f"| {r['config']} | {r['layers']} | {r['stage']} | {r['lower_s']:.1f} ({r['lower_cpu_s']:.1f}) | "
                    f"{r['compile_s']:.1f} ({r['compile_cpu_s']:.1f}) | {r['lower_s'] + r['compile_s']:.1f} | "
                    f"{r['stablehlo_lines']:,} | {r['peak_rss_gib']:.2f} |")
    return "\n".join([head, *rows])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help="target config.json (repeatable; default: configs/qwen2_5_vl_7b.json and "
                    "configs/llava_ov_7b.json)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="stages to measure (default: all)")
    ap.add_argument("--layers", nargs="+", type=int, default=None,
                    help="LM depths (num_hidden_layers) to measure instead of the config's, e.g. 2 4 (cost per layer)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                    help="parameter dtype (decode.py --dtype; bfloat16 is what a 7B target runs in)")
    ap.add_argument("--frames", type=int, default=32,
                    help="video frames (Qwen2.5-VL: 2 per temporal patch; LLaVA-OneVision: 196 tokens each)")
    ap.add_argument("--frame-side", type=int, default=448, help="Qwen2.5-VL frame side in pixels (448: 256 tokens "
                    "per temporal patch)")
    ap.add_argument("--text-tokens", type=int, default=32, help="text tokens around the video")
    ap.add_argument("--batch", type=int, default=1, help="rows (identical prompts)")
    ap.add_argument("--tree", default="48-5-10", help="draft tree TOTAL-DEPTH-TOPK (decode.py --tree)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--attention", choices=["xla", "pallas"], default="xla")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one stage may take (then it is recorded as "
                    "timed out)")
    ap.add_argument("--fast", action="store_true",
                    help="configs/tiny.json with a 4-frame 112 px video, tree 6-2-2, 8 new tokens (seconds; the test)")
    ap.add_argument("--jsonl", default=str(ROOT / "bench" / "results" / "compile_time.jsonl"))
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # worker: one stage, this process
    ap.add_argument("--record-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("frames", "frame_side", "text_tokens", "batch", "max_new_tokens"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if args.layers is not None and min(args.layers) < 2:
        ap.error(f"--layers {args.layers}: a target needs at least 2 LM layers (m* sits inside the stack)")
    try:
        TreeSpec.parse(args.tree)
    except ValueError as e:
        ap.error(f"--tree {args.tree}: {e}")
    if args.fast:
        args.config = args.config or [str(TINY)]
        args.frames, args.frame_side, args.tree, args.max_new_tokens = 4, 112, "6-2-2", 8
    args.config = args.config or [str(p) for p in CONFIGS_7B]
    for c in args.config:
        if not Path(c).is_file():
            ap.error(f"--config {c}: no such file")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.stage is not None:  # the worker
        args.config = args.config[0]
        args.layers = args.layers[0] if args.layers else None
        Path(args.record_out).write_text(json.dumps(run_stage(args)))
        return []
    env = environment()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.config:
            for layers in args.layers or [None]:
                for stage in args.stages:
                    out = Path(tmp) / f"{len(records)}.json"
                    print(f"[compile_time] {Path(config).name} layers={layers or 'config'} {stage} ...", flush=True)
                    try:
                        subprocess.run(worker_argv(args, config, layers, stage, out), check=True, timeout=args.timeout)
                        rec = json.loads(out.read_text())
                    except subprocess.TimeoutExpired:
                        rec = {"stage": stage, "config": Path(config).name, "layers": layers or "config",
                               "timed_out": True, "timeout_s": args.timeout}
                    rec = {"bench": "compile_time", **env, **rec}
                    write_jsonl(args.jsonl, rec)
                    records.append(rec)
                    if not rec.get("timed_out"):
                        print(f"[compile_time]   lower {rec['lower_s']:.1f} s (CPU {rec['lower_cpu_s']:.1f}), compile "
                              f"{rec['compile_s']:.1f} s (CPU {rec['compile_cpu_s']:.1f}), peak RSS "
                              f"{rec['peak_rss_gib']:.2f} GiB", flush=True)
    print(table(records))
    return records


if __name__ == "__main__":
    main()
