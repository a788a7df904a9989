"""Tree shape search (issue 11 §7): time candidate draft trees per visual-length bucket on this backend and
store the fastest next to the draft, for `decode.py --tree auto`.

For a target and a trained draft (decoding in the mode of the draft's visual view, models/views.py), on
held-out scenes of the tiny world (test split, the demo's caption request "Describe the video in detail."),
for each --lengths bucket (seconds of video; 16 visual tokens per second at the shipped 112 px, 2 fps):
one prefill per scene (untimed, target + draft, caches sized for the largest candidate so every candidate
runs on the same prefill and the same capacity), then greedy decoding of --max-new-tokens with every
candidate tree and with AR (the reference: its tokens/s gives DSR, its output must equal every tree's).
Each (candidate, compiled shape) gets one untimed warm-up run first (compilation), then --repeats timed
runs per scene, interleaved across candidates (machine noise hits all alike), median per scene.

Per candidate and bucket: decode tokens/s (tokens / decode time, prefill excluded), tau (tokens per
round, bonus included), seconds per round, acceptance per depth, DSR against AR; --profile adds one
round's draft/verify split (engine.profile_phases). The winner of a bucket is the candidate with the
highest tokens/s among those whose outputs equal AR's. Trees use EAGLE-2's TOTAL-DEPTH-TOPK notation
(48-5-10: 48 nodes with the root, up to 6 draft tokens per path, top-10) or chainN (N draft tokens).

Output: one JSON line per bucket (command, machine, date, versions, every candidate's row) appended to
--jsonl, and the chosen table to --out (default <draft>/tree_choice.json; sparrow_jax/decoding/tree_choice.py
describes the file), written when all buckets are done.

  python bench/tree_search.py                                   # shipped target + shipped/drafts/sparrow
  python bench/tree_search.py --draft runs/draft_sparrow/export --lengths 8,32 --scenes 2
  python bench/tree_search.py --candidates 24-5-6,48-5-10,chain4 --repeats 3
  python bench/tree_search.py --draft random --lengths 8 --scenes 1 --candidates 8-3-2,chain4 \\
      --max-new-tokens 16 --out /tmp/tree_choice.json               # pipeline check, random draft

Cost on 2 CPU cores (shipped 6-layer d256 target, fp32): a bucket costs scenes x (render + prefill +
(candidates + 1) x repeats x decode) plus (candidates + 1) compilations of the decode loop. Measured: the
pipeline check above (8 s, 1 scene, 2 candidates + AR, 16 tokens) takes 60 s of CPU time, mostly
compilation. The default run (4 lengths up to 1024 s = 16k visual tokens, 3 scenes, 9 candidates + AR,
160 tokens) is estimated, not measured, at 20-40 minutes on an idle machine, about half of it in the
1024 s bucket (a 16k-token prefill is ~35-50 s per scene, bench/prefill_memory.py; 10 decodes of 160
tokens at 16k KV per scene). --lengths 8,32 takes a few minutes; --scenes and --candidates scale it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import environment, write_jsonl  # noqa: E402
from internalization import file_sha256  # noqa: E402

RESULTS = HERE / "results"
DEFAULT_CANDIDATES = "8-3-2,12-4-3,16-4-4,24-5-6,32-5-8,48-5-10,60-6-10,chain4,chain6"


def parse_args(argv=None):
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415 — light
    from sparrow_jax.models.views import MODE_VIEW  # noqa: PLC0415

    root = HERE.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(root / "shipped" / "tiny-qwen2.5-vl"),
                    help="HF checkpoint directory of a Qwen2.5-VL target with the world's tokenizer")
    ap.add_argument("--draft", default=str(root / "shipped" / "drafts" / "sparrow"),
                    help="trained draft directory (ours or EAGLE format); 'random' = a random draft of --mode's view "
                    "(pipeline check: rarely accepted; nothing is written next to it, give --out)")
    ap.add_argument("--mode", choices=list(MODE_VIEW), default=None,
                    help="decode mode (default: the one of the draft's visual view; text_only for a random draft)")
    ap.add_argument("--lengths", default="8,32,256,1024",
                    help="comma-separated video lengths in seconds, one bucket each (8 s = 128 visual tokens)")
    ap.add_argument("--scenes", type=int, default=3, help="held-out scenes per bucket (world test split)")
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                    help="comma-separated trees, TOTAL-DEPTH-TOPK or chainN")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="greedy tokens per answer (a caption: ~130)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per scene and candidate (median)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attention", choices=["xla", "pallas"], default="xla")
    ap.add_argument("--profile", action="store_true",
                    help="also time one round's draft and verify phases per candidate (engine.profile_phases)")
    ap.add_argument("--seed", type=int, default=0, help="random draft initialisation")
    ap.add_argument("--out", default=None,
                    help="tree choice JSON (default: <draft>/tree_choice.json; '' = do not write)")
    ap.add_argument("--jsonl", default=str(RESULTS / "tree_search.jsonl"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r}: expected comma-separated whole seconds, like 8,32,256")
    if any(s < 4 for s in args.lengths) or len(set(args.lengths)) != len(args.lengths):
        ap.error(f"--lengths {args.lengths}: each length >= 4 s (the world's shortest scene), no repeats")
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not args.candidates:
        ap.error("--candidates: at least one tree")
    for c in args.candidates:
        try:
            TreeSpec.parse(c)
        except ValueError as e:
            ap.error(f"--candidates: {e}")
    if len(set(args.candidates)) != len(args.candidates):
        ap.error(f"--candidates {args.candidates}: repeated tree")
    if args.scenes < 1 or args.max_new_tokens < 2 or args.repeats < 1:
        ap.error("--scenes >= 1, --max-new-tokens >= 2 and --repeats >= 1 expected")
    target = Path(args.target)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (target / name).is_file():
            ap.error(f"--target {target}: no {name} (expected a HF checkpoint directory with the world's tokenizer)")
    if args.draft != "random" and not (Path(args.draft) / "config.json").is_file():
        ap.error(f"--draft {args.draft}: no trained draft there (config.json); train one (python train.py --config "
                 "configs/train_tiny_draft_sparrow.json --export DIR) or pass --draft random for a pipeline check")
    if args.out is None:
        args.out = "" if args.draft == "random" else str(Path(args.draft) / "tree_choice.json")
    return args


def world_prompts(codec, cfg, target: Path, seconds: int, n: int):
    """(scenes, prompts): n held-out scenes of `seconds`, each as the demo's caption request with its video
    read the way decode.py reads the demo mp4 (the target's preprocessor; codec round trip)."""
    from sparrow_jax.io.vision_inputs import VisionTokenIds  # noqa: PLC0415
    from sparrow_jax.synthetic import demo  # noqa: PLC0415
    from sparrow_jax.synthetic import world as W  # noqa: PLC0415

    wcfg = demo.target_world(target)
    ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)
    scenes = [W.make_scene(s, seconds, wcfg) for s in W.split_seeds("test", n)]
    return scenes, [W.chat_prompt(codec, W.visual_from_frames(W.render(sc, wcfg), wcfg, roundtrip=True),
                                  demo.QUESTION, ids) for sc in scenes]


def weights_sha256(target: Path) -> str:
    """The target weights' identity: sha256 (first 16 hex) of model.safetensors, as bench/internalization.py."""
    return file_sha256(target / "model.safetensors")


def main(argv=None):
    args = parse_args(argv)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from sparrow_jax.decoding import engine as E  # noqa: PLC0415
    from sparrow_jax.decoding import tree_choice  # noqa: PLC0415
    from sparrow_jax.decoding.autoregressive import ar_generate  # noqa: PLC0415
    from sparrow_jax.decoding.metrics import acceptance_summary  # noqa: PLC0415
    from sparrow_jax.decoding.sampling import SamplingParams  # noqa: PLC0415
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415
    from sparrow_jax.io.draft_checkpoint import import_official  # noqa: PLC0415
    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.models import registry, views  # noqa: PLC0415
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: PLC0415

    t_start = time.perf_counter()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    target = Path(args.target)
    model = registry.load_target(target, dtype=dtype)
    cfg = model.cfg
    if cfg.family != "qwen2_5_vl":
        sys.exit(f"tree_search.py: error: {target}: a {cfg.family} target; the world's videos are prepared for "
                 "Qwen2.5-VL targets")
    if args.draft == "random":
        view = views.view_for_mode(args.mode or "text_only")
        draft = SparrowDraft(DraftConfig.for_target(cfg, visual_view=view), rngs=nnx.Rngs(args.seed + 1), dtype=dtype)
        draft_source = f"random draft (view {view})"
    else:
        draft = import_official(args.draft, target_cfg=cfg, dtype=dtype)
        draft_source = args.draft
    view = draft.cfg.visual_view
    mode = args.mode or next(m for m, v in views.MODE_VIEW.items() if v == view)
    views.check_draft_view(view, mode, source=f"draft {draft_source}")
    specs = {c: TreeSpec.parse(c) for c in args.candidates}
    for c, s in specs.items():
        if s.top_k > cfg.text.vocab_size:
            sys.exit(f"tree_search.py: error: --candidates {c}: top-k {s.top_k} exceeds the target's vocabulary "
                     f"of {cfg.text.vocab_size} tokens")
    codec = load_codec(target, cfg.text.vocab_size)
    eos = tuple(cfg.eos_token_ids)
    M = args.max_new_tokens
    ecfgs = {c: E.EngineConfig(tree=s, max_new_tokens=M, eos_ids=eos, impl=args.attention) for c, s in specs.items()}
    # One prefill per scene serves every candidate: caches sized for the largest slack (capacity is a
    # padded bucket, so most candidates would get the same one anyway).
    cap_cfg = max(ecfgs.values(), key=lambda c: c.cache_slack)
    tgraph, tparams = nnx.split(model)
    dgraph, dparams = nnx.split(draft)
    key = jax.random.key(0)
    env = environment()
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}" + (
        f" ({env['machine']})" if env["backend"] == "cpu" else "")
    target_sha = weights_sha256(target)
    runners = ["ar", *args.candidates]
    print(f"[tree_search] target {target} (sha256 {target_sha}), draft {draft_source}, mode {mode}; backend "
          f"{env['backend']} ({device}), {args.dtype}; lengths {args.lengths} s x {args.scenes} scenes; candidates "
          f"{args.candidates}; {M} new tokens, greedy; {args.repeats} timed run(s) after a warm-up", flush=True)

    def fresh(p):
        """Copies of the prefilled caches (the loops donate theirs)."""
        return jax.block_until_ready(jax.tree.map(jnp.copy, (p.pre.cache, p.dcache)))

    def run(name, p):
        """One decode from prefill `p`: (tokens, n, decode seconds, accepted_BR or None, cut_BR or None)."""
        tcache, dcache = fresh(p)
        t0 = time.perf_counter()
        if name == "ar":
            res = jax.block_until_ready(ar_generate(tgraph, tparams, tcache, p.pre.last_logits_BV, p.pre.rope_delta_B,
                                                    key, max_new_tokens=M, sampling=SamplingParams(), eos_ids=eos,
                                                    impl=cap_cfg.impl))
            dt = time.perf_counter() - t0
            return np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B), dt, None, None
        res = jax.block_until_ready(E.speculative_generate(
            tgraph, tparams, dgraph, dparams, tcache, dcache, p.pre.last_logits_BV, p.pre.last_hidden_BD,
            p.pre.rope_delta_B, key, cfg=ecfgs[name]))
        dt = time.perf_counter() - t0
        return (np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B), dt, np.asarray(res.accepted_BR),
                np.asarray(res.cut_BR))

    per_scene = 1 + len(runners) * args.repeats
    bar = tqdm(total=len(args.lengths) * (args.scenes * per_scene + len(runners)), unit="run",
               disable=args.no_progress)
    chosen, records = [], []
    for seconds in args.lengths:
        bar.set_description(f"{seconds}s render")
        scenes, prompts = world_prompts(codec, cfg, target, seconds, args.scenes)
        nvis = max(tree_choice.visual_tokens(p) for p in prompts)
        stats = {r: {"tokens": 0, "decode_s": 0.0, "accepted": [], "cut": [], "identical": True} for r in runners}
        warm, profile, capacity = set(), {}, None
        for i, prompt in enumerate(prompts):
            bar.set_description(f"{seconds}s prefill")
            p = E.prepare(model, draft, [prompt], cap_cfg, mode=mode)
            jax.block_until_ready((p.pre, p.dcache))
            capacity = {"target": p.pre.cache.capacity, "draft": p.dcache.capacity}
            bar.update()
            shape = (p.pre.cache.capacity, p.dcache.capacity, p.batch.input_ids_BT.shape[1])
            for r in runners:
                if (r, shape) not in warm:  # compilation, untimed
                    bar.set_description(f"{seconds}s warm-up {r}")
                    run(r, p)
                    warm.add((r, shape))
                    bar.update()
                if args.profile and r != "ar" and r not in profile:
                    profile[r] = E.profile_phases(model, draft, p, ecfgs[r])
            times = {r: [] for r in runners}
            outs = {}
            for _ in range(args.repeats):
                for r in runners:
                    bar.set_description(f"{seconds}s {r}")
                    toks, n, dt, acc, cut = run(r, p)
                    times[r].append(dt)
                    outs[r] = (toks[0, :n[0]].tolist(), acc, cut)
                    bar.update()
            ref = outs["ar"][0]
            for r in runners:
                s = stats[r]
                s["tokens"] += len(outs[r][0])
                s["decode_s"] += float(np.median(times[r]))
                s["identical"] &= outs[r][0] == ref
                if r != "ar":
                    s["accepted"].append(outs[r][1])
                    s["cut"].append(outs[r][2])
        ar = stats["ar"]
        ar_tps = ar["tokens"] / ar["decode_s"]
        rows = []
        for c in args.candidates:
            s = stats[c]
            acc = acceptance_summary(np.concatenate(s["accepted"]), specs[c].max_draft_tokens, np.concatenate(s["cut"]))
            rows.append({"tree": c, "total_tokens": specs[c].total_tokens, "depth": specs[c].depth,
                         "top_k": specs[c].top_k, "max_draft_tokens": specs[c].max_draft_tokens,
                         "tokens_per_s": round(s["tokens"] / s["decode_s"], 2), "tau": round(acc["tau"], 3),
                         "rounds": acc["rounds"], "s_per_round": s["decode_s"] / max(acc["rounds"], 1),
                         "acceptance_per_depth": acc["acceptance_per_depth"], "tokens": s["tokens"],
                         "decode_s": round(s["decode_s"], 4), "DSR": round(ar["decode_s"] / s["decode_s"], 3),
                         "outputs_identical_to_ar": s["identical"], **profile.get(c, {})})
        valid = [r for r in rows if r["outputs_identical_to_ar"]]
        best = max(valid, key=lambda r: r["tokens_per_s"]) if valid else None
        bar.clear()
        print(f"\n== {seconds} s, {nvis} visual tokens, {len(prompts)} scenes, {M} new tokens: AR {ar_tps:.1f} "
              f"tokens/s ==")
        hdr = f"{'tree':>10} {'tokens/s':>9} {'DSR':>6} {'tau':>6} {'ms/round':>9} {'same as AR':>11}"
        print(hdr + "\n" + "-" * len(hdr))
        for r in rows:
            mark = " <- chosen" if r is best else ""
            print(f"{r['tree']:>10} {r['tokens_per_s']:>9.1f} {r['DSR']:>6.2f} {r['tau']:>6.2f} "
                  f"{r['s_per_round'] * 1e3:>9.2f} {str(r['outputs_identical_to_ar']):>11}{mark}", flush=True)
        if len(valid) < len(rows):
            print(f"WARNING: {len(rows) - len(valid)} candidate(s) produced output different from AR (a lossless "
                  "engine must not): left out of the choice", file=sys.stderr)
        if best is not None and best["DSR"] < 1:
            print(f"note: no tree beats AR at {seconds} s on this backend (best DSR {best['DSR']:.2f})")
        rec = {"bench": "tree_search", **env, "target": str(target), "target_sha256": target_sha,
               "draft": draft_source, "mode": mode, "view": view, "dtype": args.dtype, "seconds": seconds,
               "visual_tokens": nvis, "scenes": len(prompts), "scene_seeds": [sc.seed for sc in scenes],
               "split": "test", "max_new_tokens": M, "repeats": args.repeats, "capacity": capacity,
               "ar": {"tokens_per_s": round(ar_tps, 2), "tokens": ar["tokens"], "decode_s": round(ar["decode_s"], 4)},
               "rows": rows, "chosen": best and best["tree"]}
        write_jsonl(args.jsonl, rec)
        records.append(rec)
        if best is not None:
            chosen.append({"max_visual_tokens": nvis, "seconds": seconds, "tree": best["tree"],
                           "tokens_per_s": best["tokens_per_s"], "tau": best["tau"],
                           "s_per_round": best["s_per_round"], "ar_tokens_per_s": round(ar_tps, 2),
                           "DSR": best["DSR"]})
    bar.close()
    total_s = round(time.perf_counter() - t_start, 1)
    print(f"\n[tree_search] appended {len(records)} line(s) to {args.jsonl} ({total_s} s)")
    if args.out and chosen:
        choice = tree_choice.validate({
            "backend": env["backend"], "device": device, "dtype": args.dtype, "target": target_sha,
            "target_dir": str(target), "draft": draft_source, "mode": mode, "max_new_tokens": M,
            "scenes": args.scenes, "buckets": chosen, "command": env["command"], "date": env["date"]}, args.out)
        tree_choice.write(args.out, choice)
        print(f"[tree_search] chosen trees -> {args.out}: " +
              ", ".join(f"<= {b['max_visual_tokens']} visual tokens: {b['tree']}" for b in choice["buckets"]))
    return records


if __name__ == "__main__":
    main()
