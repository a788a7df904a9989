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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent

from sparrow_jax.models import views  # noqa: E402 — light (numpy only): mode names for --help
from sparrow_jax.models.views import MODE_VIEW  # noqa: E402


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
    ap.add_argument("--jsonl", help="append one JSON line per row with tokens, text and timings")
    return ap.parse_args(argv)


class UsageError(ValueError):
    """A command-line argument that cannot work (exit code 2)."""


def fail(message: str, code: int):
    """One line on stderr, then exit: 2 for usage errors, 1 for bad inputs and failed runs."""
    print(f"decode.py: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check_args(args):
    """Usage errors found from the arguments alone (before anything is read or loaded)."""
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415

    positive = {"--max-new-tokens": args.max_new_tokens, "--repeats": args.repeats, "--fps": args.fps,
                "--max-frames": args.max_frames, "--num-frames": args.num_frames, "--max-pixels": args.max_pixels,
                "--min-pixels": args.min_pixels, "--max-visual-tokens": args.max_visual_tokens,
                "--m-star": args.m_star}
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise UsageError(f"{flag} {value}: must be positive")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        raise UsageError(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k}: must be >= 0 (0 = off)")
    if args.mode != "pruned_visual":
        for flag, value in (("--keep-fraction", args.keep_fraction), ("--prune-by", args.prune_by)):
            if value is not None:
                raise UsageError(f"{flag} applies to --mode pruned_visual only (mode is {args.mode})")
    if args.keep_fraction is not None and not 0 < args.keep_fraction <= 1:
        raise UsageError(f"--keep-fraction {args.keep_fraction}: must be in (0, 1] (the share of visual positions "
                         "the draft keeps)")
    if args.tree == "auto":  # resolved once the prompts are built (tree_choice.auto_tree)
        tree = None
    else:
        try:
            tree = TreeSpec.parse(args.tree)
        except ValueError as e:
            raise UsageError(f"--tree {args.tree}: {str(e).removeprefix(f'tree {args.tree!r}: ')}; the notation is "
                             "TOTAL-DEPTH-TOPK (e.g. 48-5-10: 48 nodes with the root, 5 expansion steps, top-10), "
                             "chainN (N draft tokens, e.g. chain4) or auto") from None
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


def check_args_for_target(args, cfg, tree):
    """Usage errors that need the target's config.json (read before any weights)."""
    L, V = cfg.num_layers, cfg.text.vocab_size
    if args.m_star is not None and not 0 < args.m_star < L:
        raise UsageError(f"--m-star {args.m_star}: must be inside the target's decoder stack (1..{L - 1})")
    if args.top_k > V:
        raise UsageError(f"--top-k {args.top_k}: exceeds the target's vocabulary of {V} tokens")
    if args.mode != "ar" and tree is not None and tree.top_k > V:
        raise UsageError(f"--tree {args.tree}: top-k {tree.top_k} exceeds the target's vocabulary of {V} tokens")
    if cfg.family == "llava_onevision":
        for flag, value in (("--fps", args.fps), ("--max-frames", args.max_frames), ("--min-pixels", args.min_pixels),
                            ("--max-pixels", args.max_pixels)):
            if value is not None:
                raise UsageError(f"{flag} applies to Qwen2.5-VL targets; a LLaVA-OneVision target samples "
                                 "--num-frames frames per video at its own tile size")


def check_input_files(args):
    """Every --video / --image exists, is a non-empty regular file and is readable (decoding follows)."""
    from sparrow_jax.io.vision_inputs import VisionInputError, _check_regular_file  # noqa: PLC0415

    for flag, paths in (("--video", args.video), ("--image", args.image)):
        for path in paths:
            _check_regular_file(path)
            if not os.access(path, os.R_OK):
                raise VisionInputError(f"{path}: not readable ({flag})")


def check_prompt_context(prompts, cfg, max_new_tokens: int):
    """Refuse prompts that run past the target's context, before any weights are read (the rule of
    target.check_context, on the prompts' lengths and M-RoPE deltas)."""
    import types  # noqa: PLC0415

    from sparrow_jax.models import target as tg  # noqa: PLC0415

    lengths = [len(p.input_ids) for p in prompts]
    if cfg.family == "qwen2_5_vl":
        from sparrow_jax.models.qwen2_5_vl import rope_index  # noqa: PLC0415

        deltas = [rope_index(p.input_ids, p.mm_token_type_ids, [v.grid_thw for v in p.visuals],
                             [v.second_per_grid_t for v in p.visuals], cfg)[1] for p in prompts]
    else:
        deltas = [0] * len(prompts)
    tg.check_context(types.SimpleNamespace(lengths_B=lengths, rope_delta_B=deltas), cfg.text, max_new_tokens)


def model_dir(args) -> Path | None:
    """The directory holding the target's config.json (and its preprocessor JSON files, tokenizer)."""
    path = args.target or args.config
    if path is None:
        return None
    p = Path(path)
    return p if p.is_dir() else p.parent


def max_visual_tokens(args, cfg) -> int:
    from sparrow_jax.io.vision_inputs import default_max_visual_tokens  # noqa: PLC0415

    return args.max_visual_tokens or default_max_visual_tokens(cfg.text.max_position_embeddings)


def qwen_preprocessing(args, cfg):
    """(video, image) VisionPreprocessConfig of the target: its vision config, its
    video_preprocessor_config.json / preprocessor_config.json when present (a video falls back to the
    image file, as transformers does), then the explicit CLI flags and the visual-token budget."""
    from sparrow_jax.io.vision_inputs import VisionPreprocessConfig  # noqa: PLC0415

    d = model_dir(args)
    image_json = d / "preprocessor_config.json" if d and (d / "preprocessor_config.json").is_file() else None
    video_json = d / "video_preprocessor_config.json" if d and (d / "video_preprocessor_config.json").is_file() \
        else image_json
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    frames = {k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None}
    budget = max_visual_tokens(args, cfg)
    vcfg = VisionPreprocessConfig.for_model(cfg.vision, video=True, preprocessor_json=video_json,
                                            max_visual_tokens=budget, **pixels, **frames)
    icfg = VisionPreprocessConfig.for_model(cfg.vision, video=False, preprocessor_json=image_json,
                                            max_visual_tokens=budget, **pixels)
    return vcfg, icfg


def build_llava_prompts(args, cfg, codec, prompts_text, videos):
    """LLaVA-OneVision rows: chat prefix, one visual (anyres image or uniformly sampled video), question."""
    from sparrow_jax.io.llava_inputs import (  # noqa: PLC0415
        LlavaPreprocessConfig, build_prompt, preprocess_image, preprocess_video)
    from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX  # noqa: PLC0415

    d = model_dir(args)
    pcfg = (LlavaPreprocessConfig.from_hf_preprocessor_json(d / "preprocessor_config.json")
            if d and (d / "preprocessor_config.json").is_file() else None)
    budget = max_visual_tokens(args, cfg)
    visuals = ([preprocess_video(v, cfg, pcfg, num_frames=args.num_frames, max_visual_tokens=budget) for v in videos] +
               [preprocess_image(i, cfg, pcfg) for i in args.image])
    for v in visuals:
        if v.summary:
            print(f"[decode] {v.kind} {v.summary}")
    if len(visuals) > len(prompts_text):
        prompts_text += [prompts_text[-1]] * (len(visuals) - len(prompts_text))
    out = []
    for i, text in enumerate(prompts_text):
        segs = [codec.encode(QWEN_USER_PREFIX)] + ([visuals[i]] if i < len(visuals) else [])
        out.append(build_prompt(segs + [codec.encode("\n" + text + QWEN_ASSISTANT_PREFIX)], cfg))
    return prompts_text, out


def build_prompts(args, cfg, codec, workdir):
    from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX  # noqa: PLC0415
    from sparrow_jax.io.vision_inputs import (  # noqa: PLC0415
        VisionTokenIds, build_multimodal_prompt, preprocess_image, preprocess_video)

    prompts_text = args.prompt or ["What is moving in this video?"]
    videos = list(args.video)  # no inputs at all: demo.resolve_defaults has put the world sample here
    if cfg.family == "llava_onevision":
        return build_llava_prompts(args, cfg, codec, prompts_text, videos)
    vcfg, icfg = qwen_preprocessing(args, cfg)
    visuals = [preprocess_video(v, vcfg) for v in videos] + [preprocess_image(i, icfg) for i in args.image]
    for v in visuals:
        print(f"[decode] {v.kind} {v.summary}")
    if len(visuals) > len(prompts_text):
        prompts_text += [prompts_text[-1]] * (len(visuals) - len(prompts_text))
    ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)
    out = []
    for i, text in enumerate(prompts_text):
        segs = [codec.encode(QWEN_USER_PREFIX)]
        if i < len(visuals):
            segs.append(visuals[i])
        segs.append(codec.encode(text + QWEN_ASSISTANT_PREFIX))
        out.append(build_multimodal_prompt(segs, ids))
    return prompts_text, out


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
        import numpy as np  # noqa: PLC0415

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
    from sparrow_jax.synthetic import demo  # noqa: PLC0415

    sample, notes = demo.resolve_defaults(args)  # shipped target/draft; no inputs: the world sample video
    for note in notes:
        print(f"[decode] {note}", flush=True)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.decoding import engine as E  # noqa: PLC0415
    from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity  # noqa: PLC0415
    from sparrow_jax.decoding.metrics import DEFINITIONS, acceptance_summary, speed_summary  # noqa: PLC0415
    from sparrow_jax.decoding.sampling import SamplingParams  # noqa: PLC0415
    from sparrow_jax.io.draft_checkpoint import import_official  # noqa: PLC0415
    from sparrow_jax.io.hf_checkpoint import CheckpointError  # noqa: PLC0415
    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.io.vision_inputs import VisionInputError  # noqa: PLC0415
    from sparrow_jax.models import target as tg  # noqa: PLC0415
    from sparrow_jax.models.draft import DraftConfig, DraftConfigError, SparrowDraft  # noqa: PLC0415
    from sparrow_jax.models import registry  # noqa: PLC0415
    from sparrow_jax.models.qwen2_5_vl import ConfigError  # noqa: PLC0415

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    visual_mode = "text_only" if args.mode == "sparrow" else args.mode if args.mode in MODE_VIEW else None
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
    # --m-star overrides the bridge layer the draft was trained with (stored in its config); unset,
    # the engine uses the draft's own m* (or the default rule for a draft that records none).
    m_star = args.m_star
    # Order: arguments, the target's config.json, input files and their preprocessing, then weights.
    try:
        cfg = registry.config_from_dict(*registry.read_config_dict(args.target or args.config))
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        fail(e, 1)
    try:
        check_args_for_target(args, cfg, tree)
    except UsageError as e:
        fail(e, 2)
    try:
        check_input_files(args)
        codec = load_codec(args.target or args.tokenizer, cfg.text.vocab_size)
        with tempfile.TemporaryDirectory() as workdir:
            texts, prompts = build_prompts(args, cfg, codec, workdir)
        check_prompt_context(prompts, cfg, args.max_new_tokens)
        if tree is None:  # --tree auto: the draft's stored choice for the longest row's visual tokens
            from sparrow_jax.decoding import tree_choice  # noqa: PLC0415

            nvis = max(tree_choice.visual_tokens(p) for p in prompts)
            tree, note = tree_choice.auto_tree(args.draft, nvis, jax.default_backend())
            if visual_mode is not None:
                print(f"[decode] {note}", flush=True)
        draft, draft_source = None, None
        if visual_mode is not None or args.compare_ar:
            if args.draft:
                draft = import_official(args.draft, target_cfg=cfg, dtype=dtype)
                draft_source = args.draft
            else:
                view = views.view_for_mode(visual_mode or "text_only")
                draft = SparrowDraft(DraftConfig.for_target(cfg, visual_view=view), rngs=nnx.Rngs(args.seed + 1),
                                     dtype=dtype)
                draft_source = "random draft (lossless, but rarely accepted)"
            if visual_mode is not None:
                views.check_draft_view(draft.cfg.visual_view, visual_mode, allow_mismatch=args.force_view,
                                       source=f"draft {draft_source}")
        if args.target:
            model = registry.load_target(args.target, dtype=dtype)
            source = args.target
        else:
            model = registry.build_target(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype)
            source = f"random init of {args.config} (no trained weights shipped yet)"
        cfg = model.cfg
    except (CheckpointError, ConfigError, DraftConfigError, VisionInputError, ValueError, OSError) as e:
        fail(e, 1)
    print(f"[decode] target: {source}\n[decode] tokenizer: {codec.name}\n[decode] backend: {jax.default_backend()}, "
          f"dtype {args.dtype}, batch {len(prompts)}, mode {args.mode}" +
          (f", tree {tree}, draft: {draft_source}" if visual_mode else ""))

    B = len(prompts)
    tgraph, tparams = nnx.split(model)
    stream = None if (args.no_stream or args.compare_ar) else StreamPrinter(codec, B)
    eos = tuple(cfg.eos_token_ids)
    key = jax.random.key(args.seed)
    # Built once: AR and speculative runs share its cache capacity rule (cache_capacity + cache_slack).
    ecfg = E.EngineConfig(tree=tree, max_new_tokens=args.max_new_tokens, eos_ids=eos, impl=args.attention)

    def run_ar(on_emit=None):
        t0 = time.perf_counter()
        batch = registry.prepare_batch_for(cfg)(prompts, cfg)
        tg.check_context(batch, cfg.text, args.max_new_tokens)
        T = batch.input_ids_BT.shape[1]
        capacity = cache_capacity(T, args.max_new_tokens, ecfg.cache_slack)
        pre = jax.block_until_ready(tg.prefill(tgraph, tparams, batch, capacity=capacity,
                                               m_star=m_star or tg.default_m_star(cfg.num_layers), impl=args.attention))
        t1 = time.perf_counter()
        res = jax.block_until_ready(ar_generate(tgraph, tparams, pre.cache, pre.last_logits_BV, pre.rope_delta_B, key,
                                                max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos,
                                                impl=args.attention, on_emit=on_emit))
        t2 = time.perf_counter()
        return dict(tokens=np.asarray(res.tokens_BM), n=np.asarray(res.num_tokens_B), prefill_s=t1 - t0,
                    decode_s=t2 - t1, batch=batch)

    def run_spec(on_emit=None):
        dgraph, dparams = nnx.split(draft)
        t0 = time.perf_counter()
        p = E.prepare(model, draft, prompts, ecfg, mode=visual_mode, keep_fraction=args.keep_fraction,
                      prune_by=args.prune_by, m_star=m_star, allow_view_mismatch=args.force_view)
        jax.block_until_ready((p.pre, p.dcache))
        t1 = time.perf_counter()
        res = jax.block_until_ready(E.speculative_generate(
            tgraph, tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV, p.pre.last_hidden_BD,
            p.pre.rope_delta_B, key, cfg=ecfg, sampling=sampling, on_emit=on_emit))
        t2 = time.perf_counter()
        return dict(tokens=np.asarray(res.tokens_BM), n=np.asarray(res.num_tokens_B), prefill_s=t1 - t0,
                    decode_s=t2 - t1, batch=p.batch, accepted=np.asarray(res.accepted_BR),
                    cut=np.asarray(res.cut_BR))

    def median_of(results):
        """The last run's outputs with the median prefill and decode times of all runs."""
        out = dict(results[-1])
        for k in ("prefill_s", "decode_s"):
            out[k + "_runs"] = [r[k] for r in results]
            out[k] = float(np.median(out[k + "_runs"]))
        return out

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
    batch = main_run["batch"]
    record = {"mode": args.mode, "target": source, "draft": draft_source, "tree": str(tree) if visual_mode else None,
              "max_draft_tokens": tree.max_draft_tokens if visual_mode else None,
              "m_star": m_star if m_star is not None else (
                  draft.cfg.m_star if draft is not None and draft.cfg.m_star is not None
                  else tg.default_m_star(cfg.num_layers)),
              "batch": B, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
              "prefill_s": main_run["prefill_s"], "decode_s": main_run["decode_s"],
              "timed_runs": args.repeats if args.compare_ar else 1, "first_call_includes_compile": not args.compare_ar}
    print(f"[decode] prompt bucket {batch.input_ids_BT.shape[1]} tokens; prefill {main_run['prefill_s']:.2f}s, "
          f"decode {main_run['decode_s']:.2f}s ({int(main_run['n'].sum())} tokens"
          f"{'; first call includes compilation' if not args.compare_ar else f'; median of {args.repeats} runs'})")
    if "spec" in runs:
        acc = acceptance_summary(runs["spec"]["accepted"], tree.max_draft_tokens, runs["spec"]["cut"])
        record.update(acc)
        print(f"[decode] tau {acc['tau']:.2f} over {acc['rounds']} rounds; acceptance per depth "
              f"{acc['acceptance_per_depth']}")
    if "spec" in runs and args.profile:
        p = E.prepare(model, draft, prompts, ecfg, mode=visual_mode, keep_fraction=args.keep_fraction,
                      prune_by=args.prune_by, m_star=m_star, allow_view_mismatch=args.force_view)
        split = E.profile_phases(model, draft, p, ecfg, sampling=sampling)
        record.update(split)
        print(f"[decode] per round: draft {split['draft_s_per_round'] * 1e3:.2f} ms, verify "
              f"{split['verify_s_per_round'] * 1e3:.2f} ms")
    failure = None
    if "spec" in runs and "ar" in runs:
        ar, spec = runs["ar"], runs["spec"]
        diff = first_mismatch(spec["tokens"], spec["n"], ar["tokens"], ar["n"])
        record.update(ar_prefill_s=ar["prefill_s"], ar_decode_s=ar["decode_s"], outputs_identical_to_ar=diff is None)
        timings = (f"AR prefill {ar['prefill_s']:.2f}s decode {ar['decode_s']:.2f}s ({int(ar['n'].sum())} tokens, "
                   f"{ar['n'].sum() / ar['decode_s']:.0f} tokens/s), speculative prefill {spec['prefill_s']:.2f}s "
                   f"decode {spec['decode_s']:.2f}s ({int(spec['n'].sum())} tokens, "
                   f"{spec['n'].sum() / spec['decode_s']:.0f} tokens/s)")
        if diff is None:
            sp = speed_summary(ar_prefill_s=ar["prefill_s"], ar_decode_s=ar["decode_s"],
                               spec_prefill_s=spec["prefill_s"], spec_decode_s=spec["decode_s"])
            record.update(sp)
            print(f"[decode] {timings} -> DSR {sp['DSR']:.2f}, ESR {sp['ESR']:.2f}, prefill share "
                  f"{sp['prefill_share_spec']:.1%}; outputs identical to AR")
        else:
            row, pos, got, want = diff
            record["first_mismatch"] = {"row": row, "position": pos, "speculative": got, "ar": want}
            if sampling.greedy:
                failure = (f"speculative output differs from AR at row {row}, position {pos}: speculative token "
                           f"{got}, AR token {want} (None = that run had stopped); no DSR/ESR reported")
                print(f"[decode] {timings}\n[decode] MISMATCH: {failure}")
            else:
                print(f"[decode] {timings}; sampling: AR and speculative outputs are different draws of the same "
                      f"law, and DSR/ESR are defined on identical outputs, so none is reported")
    print(f"[decode] {DEFINITIONS}")
    for b, text in enumerate(texts):
        ids = main_run["tokens"][b, :main_run["n"][b]].tolist()
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
