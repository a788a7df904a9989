"""Generate answers about videos/images with a Qwen2.5-VL or LLaVA-OneVision target (JAX).

With no arguments it runs the project's small default: a random-initialised target of the shipped
tiny architecture (configs/tiny.json) on a procedurally generated video — a smoke run of the whole
pipeline (video decode -> patches -> vision tower -> prefill -> jitted generation loop) that needs no
download. Point --target at a HF checkpoint directory to run a real model.

  python decode.py
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
up to DEPTH + 1 draft tokens (48-5-10: up to 6); TOPK children per expanded node.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    src.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"),
                     help="architecture for a random-initialised target when --target is not given")
    src.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="parameter/compute dtype (CPU: float32 is much faster)")
    inp = ap.add_argument_group("inputs (one row per --prompt; --video/--image attach to prompts in order)")
    inp.add_argument("--prompt", action="append", help="question text; repeat for a batch")
    inp.add_argument("--video", action="append", default=[], help="video file (mp4/webm/mkv); repeatable")
    inp.add_argument("--image", action="append", default=[], help="image file; repeatable")
    inp.add_argument("--fps", type=float, default=2.0, help="video sampling rate (frames per second)")
    inp.add_argument("--max-frames", type=int, default=768)
    inp.add_argument("--num-frames", type=int, default=32,
                     help="LLaVA-OneVision: frames sampled uniformly per video")
    inp.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel budget (Qwen resize rule)")
    inp.add_argument("--min-pixels", type=int, default=None, help="per-frame pixel floor (Qwen resize rule)")
    gen = ap.add_argument_group("generation")
    gen.add_argument("--mode", choices=["ar", "sparrow", *(m for m in MODE_VIEW if m != "text_only")],
                     default="sparrow",
                     help="decoding mode: the draft view it runs (see above); sparrow = text-only draft")
    gen.add_argument("--force-view", action="store_true",
                     help="run a draft in a mode whose visual view it was not trained for (its inputs then differ "
                     "from training; output stays lossless)")
    gen.add_argument("--draft", help="draft checkpoint directory (ours or EAGLE format); default: random draft")
    gen.add_argument("--tree", default="48-5-10",
                     help="draft tree TOTAL-DEPTH-TOPK in EAGLE-2's notation: TOTAL nodes verified (root included), "
                     "DEPTH expansion steps after the first (a path holds up to DEPTH+1 draft tokens), TOPK children "
                     "per node; or chainN (N draft tokens, top-1). Paper: Qwen2.5-VL 48-5-10, LLaVA-OV 30-4-8")
    gen.add_argument("--m-star", type=int, default=None,
                     help="bridge layer m*: the target hidden state after decoder layer m* (HF hidden_states[m*]); "
                     "default num_layers // 2 + 1, i.e. 15 of 28 as the released Sparrow code's hidden_states[-14]")
    gen.add_argument("--keep-fraction", type=float, default=None,
                     help="pruned_visual: fraction of visual positions kept (default: the draft's trained setting, "
                     "0.1 for a random draft)")
    gen.add_argument("--prune-by", choices=["uniform", "attention"], default=None,
                     help="pruned_visual: evenly spaced, or most attended by the last prompt token at layer m* "
                     "(default: the draft's trained setting, uniform for a random draft)")
    gen.add_argument("--compare-ar", action="store_true",
                     help="also run AR with the same cache capacity and print DSR/ESR: one warm-up run each, then the "
                     "median of --repeats timed runs each (alternating, no streaming). Greedy outputs must be "
                     "identical: otherwise the first mismatch is printed and decode.py exits 1; under sampling "
                     "(different draws of the same law) only the timings are printed")
    gen.add_argument("--repeats", type=int, default=3, help="--compare-ar: timed runs per decoder (median reported)")
    gen.add_argument("--no-stream", action="store_true", help="do not print tokens as they are committed")
    gen.add_argument("--profile", action="store_true", help="also time one round's draft phase and verify phase "
                     "separately (the fused loop cannot report the split)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--attention", choices=["xla", "pallas"], default="xla", help="attention implementation")
    ap.add_argument("--jsonl", help="append one JSON line per row with tokens, text and timings")
    return ap.parse_args(argv)


def build_llava_prompts(args, cfg, codec, prompts_text, videos):
    """LLaVA-OneVision rows: chat prefix, one visual (anyres image or uniformly sampled video), question."""
    from sparrow_jax.io.llava_inputs import build_prompt, preprocess_image, preprocess_video  # noqa: PLC0415
    from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX  # noqa: PLC0415

    visuals = ([preprocess_video(v, cfg, num_frames=args.num_frames) for v in videos] +
               [preprocess_image(i, cfg) for i in args.image])
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
        VisionPreprocessConfig, VisionTokenIds, build_multimodal_prompt, preprocess_image, preprocess_video)
    from sparrow_jax.synthetic.video import demo_video  # noqa: PLC0415

    prompts_text = args.prompt or ["What is moving in this video?"]
    videos = list(args.video)
    if not args.prompt and not videos and not args.image:
        path, scene = demo_video(Path(workdir) / "demo.mp4", seed=args.seed)
        print(f"[decode] no inputs given: generated {path.name} with {len(scene)} moving object(s)")
        videos = [str(path)]
    if cfg.family == "llava_onevision":
        return build_llava_prompts(args, cfg, codec, prompts_text, videos)

    def bounds(base):
        kw = {}
        if args.max_pixels:
            kw["max_pixels"] = args.max_pixels
            kw["min_pixels"] = min(base.min_pixels, args.max_pixels)
        if args.min_pixels:
            kw["min_pixels"] = args.min_pixels
        return kw

    vcfg = VisionPreprocessConfig.for_video(fps=args.fps, max_frames=args.max_frames,
                                            **bounds(VisionPreprocessConfig.for_video()))
    icfg = VisionPreprocessConfig(**bounds(VisionPreprocessConfig()))
    visuals = [preprocess_video(v, vcfg) for v in videos] + [preprocess_image(i, icfg) for i in args.image]
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
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.decoding import engine as E  # noqa: PLC0415
    from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity  # noqa: PLC0415
    from sparrow_jax.decoding.metrics import DEFINITIONS, acceptance_summary, speed_summary  # noqa: PLC0415
    from sparrow_jax.decoding.sampling import SamplingParams  # noqa: PLC0415
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415
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
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
        tree = TreeSpec.parse(args.tree)
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats}: need at least 1 timed run")
        if args.target:
            model = registry.load_target(args.target, dtype=dtype)
            source = args.target
        else:
            cfg = registry.config_from_dict(*registry.read_config_dict(args.config))
            model = registry.build_target(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype)
            source = f"random init of {args.config} (no trained weights shipped yet)"
        cfg = model.cfg
        # --m-star overrides the bridge layer the draft was trained with (stored in its config); unset,
        # the engine uses the draft's own m* (or the default rule for a draft that records none).
        m_star = args.m_star
        if m_star is not None and not 0 < m_star < cfg.num_layers:
            raise ValueError(f"--m-star {m_star}: must be inside the target's decoder stack (1..{cfg.num_layers - 1})")
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
        codec = load_codec(args.target, cfg.text.vocab_size)
        with tempfile.TemporaryDirectory() as workdir:
            texts, prompts = build_prompts(args, cfg, codec, workdir)
    except (CheckpointError, ConfigError, DraftConfigError, VisionInputError, ValueError, OSError) as e:
        sys.exit(f"decode.py: error: {e}")
    print(f"[decode] target: {source}\n[decode] tokenizer: {codec.name}\n[decode] backend: {jax.default_backend()}, "
          f"dtype {args.dtype}, batch {len(prompts)}, mode {args.mode}" +
          (f", tree {tree}, draft: {draft_source}" if visual_mode else ""))

    B = len(prompts)
    tgraph, tparams = nnx.split(model)
    stream = None if (args.no_stream or args.compare_ar) else StreamPrinter(codec, B)
    eos = tuple(cfg.eos_token_ids)
    key = jax.random.key(args.seed)
    # Built once: AR and speculative runs share its cache capacity rule (cache_capacity + cache_slack).
    ecfg = E.EngineConfig(tree=tree, max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos,
                          impl=args.attention)

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
        run_cfg = dataclasses.replace(ecfg, on_emit=on_emit)
        dgraph, dparams = nnx.split(draft)
        t0 = time.perf_counter()
        p = E.prepare(model, draft, prompts, run_cfg, mode=visual_mode, keep_fraction=args.keep_fraction,
                      prune_by=args.prune_by, m_star=m_star, allow_view_mismatch=args.force_view)
        jax.block_until_ready((p.pre, p.dcache))
        t1 = time.perf_counter()
        res = jax.block_until_ready(E.speculative_generate(
            tgraph, tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV, p.pre.last_hidden_BD,
            p.pre.rope_delta_B, key, cfg=run_cfg))
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
    except tg.ContextLengthError as e:
        sys.exit(f"decode.py: error: {e}")
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
        split = E.profile_phases(model, draft, p, ecfg)
        record.update(split)
        print(f"[decode] per round: draft {split['draft_s_per_round'] * 1e3:.2f} ms, verify "
              f"{split['verify_s_per_round'] * 1e3:.2f} ms")
    failure = None
    if "spec" in runs and "ar" in runs:
        ar, spec = runs["ar"], runs["spec"]
        diff = first_mismatch(spec["tokens"], spec["n"], ar["tokens"], ar["n"])
        record.update(ar_prefill_s=ar["prefill_s"], ar_decode_s=ar["decode_s"], outputs_identical_to_ar=diff is None)
        timings = (f"AR prefill {ar['prefill_s']:.2f}s decode {ar['decode_s']:.2f}s ({int(ar['n'].sum())} tokens), "
                   f"speculative prefill {spec['prefill_s']:.2f}s decode {spec['decode_s']:.2f}s "
                   f"({int(spec['n'].sum())} tokens)")
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
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({**record, "row": b, "prompt": text, "tokens": ids, "text": answer,
                                    "prompt_tokens": len(prompts[b].input_ids), "visual_tokens": nvis}) + "\n")
    if failure is not None:
        sys.exit(f"decode.py: error: {failure}")


if __name__ == "__main__":
    main()
