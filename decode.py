"""Generate answers about videos/images with a Qwen2.5-VL or LLaVA-OneVision target (JAX).

With no arguments it runs the shipped tiny video LLM (shipped/tiny-qwen2.5-vl, Qwen2.5-VL architecture,
trained here on the procedural video world) with its shipped Sparrow draft on a held-out world video
generated from a fixed seed (8 s; --long: 1024 s, 16k visual tokens), asks for a detailed caption,
streams the answer, then times AR against speculative decoding (tau, tokens/s, DSR, ESR; outputs checked
identical) and scores the caption against the scene graph (sparrow_jax/synthetic/demo.py). Without the
shipped weights it falls back to a random-initialised configs/tiny.json (the pipeline runs, the answer
is noise). Point --target at a HF checkpoint directory to run another model.

  python decode.py
  python decode.py --long
  python decode.py --target ~/ckpt/Qwen2.5-VL-7B-Instruct --video a.mp4 --prompt "What happens?" --dtype bfloat16
  python decode.py --video a.mp4 --prompt "Describe." --video b.mp4 --prompt "Count the objects." --jsonl out.jsonl

Modes and the draft *visual view* each runs (a draft decodes only in the view it was trained for,
stored in its config.json as `visual_view`; --force-view overrides the check):
  ar             the target alone (the baseline)
  sparrow        view none: text-only draft sequence, compacted positions (Sparrow VATA + HSR; also plain
                 EAGLE drafts)
  ivsb_mid       view ivsb_mid: visual slots carry the target's layer-m* states, placed as in IVSB
                 training (the paper's "IVSB + MTP w/o VATA" ablation)
  full_visual    view msd: every visual position carries the target's own visual embedding (MSD-style)
  pruned_visual  view pruned: the msd view keeping a fraction of the visual positions (default 10 %,
                 SpecVLM's drop rate) — a pruned-visual EAGLE-style draft, not SpecVLM itself
Without --draft a random draft of the mode's view is used: output stays exactly the target's (the
verifier guarantees it) but few drafts are accepted. --compare-ar runs AR too and prints DSR/ESR.

Trees use EAGLE-2's / the released Sparrow code's notation TOTAL-DEPTH-TOPK (`total_token`, `depth`,
`top_k`): TOTAL nodes verified, root included; DEPTH expansion steps after the first, so a path holds
up to DEPTH + 1 draft tokens (48-5-10: up to 6); TOPK children per expanded node. The default
`--tree auto` takes the tree stored next to the draft (<draft>/tree_choice.json, measured by
bench/tree_search.py on a backend) for the prompt's visual length, else 48-5-10 (printed with the reason).

decode.py is a CLI over the Python API (sparrow_jax/api.py, README "Python API"): its flags build one
DecodeConfig, which runs the engine and is written into every --jsonl line ("config").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent

import jax  # noqa: E402 — after HF_HUB_OFFLINE is set

from sparrow_jax import api  # noqa: E402
from sparrow_jax.decoding.metrics import DEFINITIONS, speed_summary  # noqa: E402
from sparrow_jax.io.hf_checkpoint import CheckpointError  # noqa: E402
from sparrow_jax.io.vision_inputs import VisionInputError, _check_regular_file  # noqa: E402
from sparrow_jax.models.config_io import ConfigError  # noqa: E402
from sparrow_jax.models.draft import DraftConfigError  # noqa: E402
from sparrow_jax.models.views import MODE_VIEW  # noqa: E402
from sparrow_jax.synthetic import demo  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("model")
    src.add_argument("--target", help="HF checkpoint directory (config.json + safetensors); the family "
                     "(qwen2_5_vl, llava_onevision) is read from config.json's model_type")
    src.add_argument("--config", default=None,
                     help="architecture for a random-initialised target when --target is not given (default: the "
                     "shipped target when its weights are there, else a random configs/tiny.json)")
    src.add_argument("--tokenizer", default=None,
                     help="directory with tokenizer.json for a random-initialised target (default: the target's own)")
    src.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="parameter/compute dtype (CPU: float32 is much faster)")
    inp = ap.add_argument_group("inputs (one row per --prompt; --video/--image attach to prompts in order)")
    inp.add_argument("--prompt", action="append", help="question text; repeat for a batch")
    inp.add_argument("--video", action="append", default=[], help="video file (mp4/webm/mkv); repeatable")
    inp.add_argument("--image", action="append", default=[], help="image file; repeatable")
    inp.add_argument("--long", action="store_true",
                     help="no inputs given: the long demo video (1024 s, 16k visual tokens) instead of the 8 s one")
    inp.add_argument("--fps", type=float, default=None,
                     help="Qwen2.5-VL: video sampling rate in frames per second, by presentation time (default: the "
                     "target's video_preprocessor_config.json, else 2)")
    inp.add_argument("--max-frames", type=int, default=None,
                     help="Qwen2.5-VL: most frames sampled per video (default: the target's preprocessor, else 768)")
    inp.add_argument("--num-frames", type=int, default=32,
                     help="LLaVA-OneVision: frames sampled uniformly per video")
    inp.add_argument("--max-pixels", type=int, default=None,
                     help="Qwen2.5-VL: per-frame pixel cap (default: the target's preprocessor config)")
    inp.add_argument("--min-pixels", type=int, default=None,
                     help="Qwen2.5-VL: per-frame pixel floor (default: the target's preprocessor config)")
    inp.add_argument("--max-visual-tokens", type=int, default=None,
                     help="visual tokens one video or image may take: frames are shrunk, then fewer frames sampled, "
                     "to fit (default: 90%% of the target's context, qwen-vl-utils' VIDEO_TOTAL_PIXELS rule); "
                     "what was applied is printed")
    gen = ap.add_argument_group("generation")
    gen.add_argument("--mode", choices=["ar", "sparrow", *(m for m in MODE_VIEW if m != "text_only")],
                     default="sparrow",
                     help="decoding mode: the draft view it runs (see above); sparrow = text-only draft")
    gen.add_argument("--force-view", action="store_true",
                     help="run a draft in a mode whose visual view it was not trained for (its inputs then differ "
                     "from training; output stays lossless)")
    gen.add_argument("--draft", help="draft checkpoint directory (ours or EAGLE format); default: random draft")
    gen.add_argument("--tree", default="auto",
                     help="draft tree TOTAL-DEPTH-TOPK in EAGLE-2's notation: TOTAL nodes verified (root included), "
                     "DEPTH expansion steps after the first (a path holds up to DEPTH+1 draft tokens), TOPK children "
                     "per node; or chainN (N draft tokens, top-1). Paper: Qwen2.5-VL 48-5-10, LLaVA-OV 30-4-8. "
                     "auto (default): the draft directory's tree_choice.json (bench/tree_search.py) for the prompt's "
                     "visual token count, measured on this backend; else 48-5-10")
    gen.add_argument("--m-star", type=int, default=None,
                     help="bridge layer m*: the target hidden state after decoder layer m* (HF hidden_states[m*]); "
                     "default num_layers // 2 + 1, i.e. 15 of 28 as the released Sparrow code's hidden_states[-14]")
    gen.add_argument("--keep-fraction", type=float, default=None,
                     help="pruned_visual: fraction of visual positions kept (default: the draft's trained setting, "
                     "0.1 for a random draft)")
    gen.add_argument("--prune-by", choices=["uniform", "attention"], default=None,
                     help="pruned_visual: evenly spaced, or most attended by the last prompt token at layer m* "
                     "(default: the draft's trained setting, uniform for a random draft)")
    gen.add_argument("--compare-ar", action=argparse.BooleanOptionalAction, default=None,
                     help="also run AR with the same cache capacity and print DSR/ESR (default: on when no inputs are "
                     "given; then one streamed speculative run comes first): one warm-up run each, then the median "
                     "of --repeats timed runs each (alternating, no streaming). Greedy outputs must be identical: "
                     "otherwise the first mismatch is printed and decode.py exits 1; under sampling "
                     "(different draws of the same law) only the timings are printed")
    gen.add_argument("--repeats", type=int, default=None,
                     help="--compare-ar: timed runs per decoder, median reported (default 3; 1 for --long)")
    gen.add_argument("--no-stream", action="store_true", help="do not print tokens as they are committed")
    gen.add_argument("--profile", action="store_true", help="also time one round's draft phase and verify phase "
                     "separately (the fused loop cannot report the split)")
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="default 32; with no inputs, room for a caption (160, --long 320)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--attention", choices=["xla", "pallas"], default="xla", help="attention implementation")
    gen.add_argument("--mesh", default=None,
                     help="run the target tensor-parallel over a device mesh, e.g. data=1,tensor=8: heads, MLP, vocab "
                     "and the KV cache's KV heads split over `tensor`, batch rows over `data`, the draft replicated "
                     "(data*tensor must be the device count; tensor must divide the attention and KV heads). On CPU: "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8. Default: one device")
    ap.add_argument("--jsonl", help="append one JSON line per row with tokens, text and timings")
    return ap.parse_args(argv)


class UsageError(ValueError):
    """A command-line argument that cannot work (exit code 2)."""


def fail(message: str, code: int):
    """One line on stderr, then exit: 2 for usage errors, 1 for bad inputs and failed runs."""
    print(f"decode.py: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def cli_flag(setting: str) -> str:
    """A DecodeConfig setting as its command-line flag (messages of the shared checks)."""
    return "--" + setting.replace("_", "-")


def settings(args) -> dict:
    """The flags as the decode settings api.check_settings / check_for_target read (None = not given)."""
    return {key: getattr(args, key) for key in (
        "mode", "tree", "max_new_tokens", "m_star", "keep_fraction", "prune_by", "temperature", "top_p", "top_k",
        "fps", "max_frames", "min_pixels", "max_pixels", "num_frames", "max_visual_tokens", "mesh")}


def check_args(args):
    """Usage errors found from the arguments alone (before anything is read or loaded)."""

    try:
        tree = api.check_settings(settings(args), cli_flag)
    except api.DecodeConfigError as e:
        raise UsageError(str(e)) from None
    if args.repeats is not None and not args.repeats > 0:
        raise UsageError(f"--repeats {args.repeats}: must be positive")
    if args.jsonl:
        check_writable(args.jsonl, "--jsonl")
    return tree


def check_writable(path, flag: str):
    """An output file we can append to: an existing writable file, or a new one in a writable directory."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {path}: file is not writable")
        return
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable")


def check_args_for_target(args, cfg):
    """Usage errors that need the target's config.json (read before any weights)."""

    try:
        api.check_for_target({**settings(args), "batch": len(cli_rows(args)[0])}, cfg, cli_flag)
    except api.DecodeConfigError as e:
        raise UsageError(str(e)) from None


def decode_config(args):
    """The run's one DecodeConfig, from the flags (after demo.resolve_defaults filled the defaults): it
    runs the engine and is written into every JSON line."""

    return api.DecodeConfig(
        mode=args.mode, tree=args.tree, max_new_tokens=args.max_new_tokens,
        sampling=api.SamplingParams(args.temperature, args.top_p, args.top_k), seed=args.seed,
        attention=args.attention, m_star=args.m_star, keep_fraction=args.keep_fraction, prune_by=args.prune_by,
        force_view=args.force_view, vision=vision_options(args), mesh=args.mesh)


def vision_options(args):

    return api.VisionOptions(fps=args.fps, max_frames=args.max_frames, min_pixels=args.min_pixels,
                             max_pixels=args.max_pixels, num_frames=args.num_frames,
                             max_visual_tokens=args.max_visual_tokens)


def check_input_files(args):
    """Every --video / --image exists, is a non-empty regular file and is readable (decoding follows)."""

    for flag, paths in (("--video", args.video), ("--image", args.image)):
        for path in paths:
            _check_regular_file(path)
            if not os.access(path, os.R_OK):
                raise VisionInputError(f"{path}: not readable ({flag})")


def model_dir(args) -> Path | None:
    """The directory holding the target's config.json (and its preprocessor JSON files, tokenizer)."""
    path = args.target or args.config
    if path is None:
        return None
    p = Path(path)
    return p if p.is_dir() else p.parent


def cli_rows(args):
    """(texts, videos, images), one entry per row: one row per --prompt, --video then --image attached to
    the rows in order (None: no visual), the last prompt repeated for visuals past the prompts."""
    texts = list(args.prompt or ["What is moving in this video?"])
    visuals = [("video", v) for v in args.video] + [("image", i) for i in args.image]
    texts += [texts[-1]] * (len(visuals) - len(texts))
    visuals += [(None, None)] * (len(texts) - len(visuals))
    return (texts, [v if k == "video" else None for k, v in visuals],
            [v if k == "image" else None for k, v in visuals])


def build_prompts(args, processor):
    """(texts, prompts) of the run through the target's `api.Processor` (its preprocessor files); prints
    what the preprocessing applied to each visual."""
    texts, videos, images = cli_rows(args)
    prompts = processor(texts, videos, images, vision_options(args))
    for p in prompts:
        for v in p.visuals:
            if v.summary:
                print(f"[decode] {v.kind} {v.summary}")
    return texts, prompts


def first_mismatch(tokens_a, n_a, tokens_b, n_b):
    """First position where two runs' outputs differ: (row, position, token_a, token_b), a token being
    None where that run had already stopped; None when every row is identical."""
    for b in range(len(n_a)):
        a, c = list(tokens_a[b, :n_a[b]]), list(tokens_b[b, :n_b[b]])
        if a != c:
            i = next((j for j, (x, y) in enumerate(zip(a, c)) if x != y), min(len(a), len(c)))
            return b, i, (int(a[i]) if i < len(a) else None), (int(c[i]) if i < len(c) else None)
    return None


class StreamPrinter:
    """Host hook for the jitted loops: prints each row's newly committed tokens."""

    def __init__(self, codec, rows: int):
        self.codec, self.rows = codec, rows

    def __call__(self, tokens, counts):
        tokens, counts = np.asarray(tokens), np.asarray(counts)
        for b in range(tokens.shape[0]):
            if counts[b] > 0:
                text = self.codec.decode(tokens[b, :counts[b]].tolist())
                prefix = f"[{b}] " if self.rows > 1 else ""
                print(f"{prefix}{text}" if self.rows > 1 else text, end="\n" if self.rows > 1 else "", flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        tree = check_args(args)
    except UsageError as e:
        fail(e, 2)

    sample, notes = demo.resolve_defaults(args)  # shipped target/draft; no inputs: the world sample video
    for note in notes:
        print(f"[decode] {note}", flush=True)


    visual_mode = "text_only" if args.mode == "sparrow" else args.mode if args.mode in MODE_VIEW else None
    try:
        config = decode_config(args)  # the flags passed check_args: this only packs them
    except api.DecodeConfigError as e:
        fail(e, 2)
    # Order: arguments, the target's config.json, input files and their preprocessing, then weights.
    try:
        processor = (api.Processor.from_pretrained(args.target) if args.target else
                     api.Processor.from_config(args.config, tokenizer_dir=args.tokenizer))
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        fail(e, 1)
    cfg = processor.cfg
    try:
        check_args_for_target(args, cfg)
    except UsageError as e:
        fail(e, 2)
    try:
        check_input_files(args)
        codec = processor.codec
        texts, prompts = build_prompts(args, processor)
        processor.check_context(prompts, args.max_new_tokens)
        if tree is None:  # --tree auto: the draft's stored choice for the longest row's visual tokens
            tree, note = api.resolve_tree(args.tree, args.draft, prompts)
            if visual_mode is not None:
                print(f"[decode] {note}", flush=True)
        # The draft is loaded (and its fit checked) when a speculative run needs it.
        draft_dir = args.draft if visual_mode is not None or args.compare_ar else None
        common = dict(config=config, dtype=args.dtype, seed=args.seed, processor=processor)
        if args.target:
            decoder = api.SpecDecoder.from_pretrained(args.target, draft_dir, **common)
        else:
            decoder = api.SpecDecoder.from_config(args.config, draft_dir, **common,
                                                  source=f"random init of {args.config} (no trained weights shipped yet)")
        cfg = decoder.target.cfg
    except (CheckpointError, ConfigError, DraftConfigError, VisionInputError, ValueError, OSError) as e:
        fail(e, 1)
    print(f"[decode] target: {decoder.target_source}\n[decode] tokenizer: {codec.name}\n[decode] backend: "
          f"{jax.default_backend()}, dtype {args.dtype}, batch {len(prompts)}, mode {args.mode}" +
          (f", mesh {decoder.mesh_spec} ({len(jax.devices())} devices)" if decoder.mesh_spec else "") +
          (f", tree {tree}, draft: {decoder.draft_source}" if visual_mode else ""))

    B = len(prompts)
    stream = None if (args.no_stream or args.compare_ar) else StreamPrinter(codec, B)
    # Both runs take their cache capacity from the tree (cache_capacity + the engine's cache slack).
    ar_config = dataclasses.replace(config, mode="ar")

    def run_ar(on_emit=None):
        return decoder.run(prompts, ar_config, tree=tree, on_emit=on_emit)

    def run_spec(on_emit=None):
        return decoder.run(prompts, config, tree=tree, on_emit=on_emit)

    def median_of(results):
        """The last run's outputs with the median prefill and decode times of all runs."""
        return dataclasses.replace(results[-1], prefill_s=float(np.median([r.prefill_s for r in results])),
                                   decode_s=float(np.median([r.decode_s for r in results])))

    runs = {}
    try:
        if args.compare_ar:
            if sample is not None and visual_mode and not args.no_stream:  # the demo shows its answer first
                print("[decode] speculative answer, streamed (untimed run):", flush=True)
                run_spec(StreamPrinter(codec, B))
                print(flush=True)
            print(f"[decode] warm-up runs (compilation), then {args.repeats} timed run(s) each ...", flush=True)
            runners = {"ar": run_ar, "spec": run_spec} if visual_mode else {"ar": run_ar}
            for run in runners.values():
                run()
            timed = {name: [] for name in runners}
            for _ in range(args.repeats):  # alternating: machine noise hits both alike
                for name, run in runners.items():
                    timed[name].append(run())
            runs = {name: median_of(rs) for name, rs in timed.items()}
        elif visual_mode is None:
            runs["ar"] = run_ar(stream)
        else:
            runs["spec"] = run_spec(stream)
    except ValueError as e:  # engine.prepare / prefill refusals (context, views, trees): clear messages
        fail(e, 1)
    if stream is not None:
        print()
    main_run = runs.get("spec", runs.get("ar"))
    batch = main_run.batch
    # The API's record (mode, target, draft, tree, m*, sampling, timings, tau, the DecodeConfig), then
    # what only the CLI knows: how it timed, the AR comparison, the per-phase profile.
    record = decoder.record(main_run)
    record.update(timed_runs=args.repeats if args.compare_ar else 1, first_call_includes_compile=not args.compare_ar)
    print(f"[decode] prompt bucket {batch.input_ids_BT.shape[1]} tokens; prefill {main_run.prefill_s:.2f}s, "
          f"decode {main_run.decode_s:.2f}s ({int(main_run.num_tokens_B.sum())} tokens"
          f"{'; first call includes compilation' if not args.compare_ar else f'; median of {args.repeats} runs'})")
    if "spec" in runs:
        print(f"[decode] tau {record['tau']:.2f} over {record['rounds']} rounds; acceptance per depth "
              f"{record['acceptance_per_depth']}")
    if "spec" in runs and args.profile:
        split = decoder.profile_phases(prompts, config, tree=tree)
        record.update(split)
        print(f"[decode] per round: draft {split['draft_s_per_round'] * 1e3:.2f} ms, verify "
              f"{split['verify_s_per_round'] * 1e3:.2f} ms")
    failure = None
    if "spec" in runs and "ar" in runs:
        ar, spec = runs["ar"], runs["spec"]
        diff = first_mismatch(spec.tokens_BM, spec.num_tokens_B, ar.tokens_BM, ar.num_tokens_B)
        record.update(ar_prefill_s=ar.prefill_s, ar_decode_s=ar.decode_s, outputs_identical_to_ar=diff is None)
        timings = (f"AR prefill {ar.prefill_s:.2f}s decode {ar.decode_s:.2f}s ({int(ar.num_tokens_B.sum())} tokens, "
                   f"{ar.num_tokens_B.sum() / ar.decode_s:.0f} tokens/s), speculative prefill {spec.prefill_s:.2f}s "
                   f"decode {spec.decode_s:.2f}s ({int(spec.num_tokens_B.sum())} tokens, "
                   f"{spec.num_tokens_B.sum() / spec.decode_s:.0f} tokens/s)")
        if diff is None:
            sp = speed_summary(ar_prefill_s=ar.prefill_s, ar_decode_s=ar.decode_s,
                               spec_prefill_s=spec.prefill_s, spec_decode_s=spec.decode_s)
            record.update(sp)
            print(f"[decode] {timings} -> DSR {sp['DSR']:.2f}, ESR {sp['ESR']:.2f}, prefill share "
                  f"{sp['prefill_share_spec']:.1%}; outputs identical to AR")
        else:
            row, pos, got, want = diff
            record["first_mismatch"] = {"row": row, "position": pos, "speculative": got, "ar": want}
            if config.sampling.greedy:
                failure = (f"speculative output differs from AR at row {row}, position {pos}: speculative token "
                           f"{got}, AR token {want} (None = that run had stopped); no DSR/ESR reported")
                print(f"[decode] {timings}\n[decode] MISMATCH: {failure}")
            else:
                print(f"[decode] {timings}; sampling: AR and speculative outputs are different draws of the same "
                      f"law, and DSR/ESR are defined on identical outputs, so none is reported")
    print(f"[decode] {DEFINITIONS}")
    for b, text in enumerate(texts):
        ids = main_run.token_ids(b)
        answer = codec.decode(ids)
        nvis = int(batch.vis_len_B[b])
        print(f"\n[{b}] Q: {text}  ({len(prompts[b].input_ids)} prompt tokens, {nvis} visual)\n[{b}] A: {answer!r}"
              f"\n[{b}] ids: {ids}")
        if sample is not None:  # the world knows what the video shows
            print(f"[{b}] truth: {sample.truth()!r}\n[{b}] {sample.score(answer)}")
        if args.jsonl:  # one line per row as it is printed (checked writable before any work)
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({**record, "row": b, "prompt": text, "tokens": ids, "text": answer,
                                    "prompt_tokens": len(prompts[b].input_ids), "visual_tokens": nvis}) + "\n")
                f.flush()
    if failure is not None:
        fail(failure, 1)


if __name__ == "__main__":
    main()
