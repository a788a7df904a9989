"""Length sweep (issue 11 §1; the paper's Figure 1 and Table 2 shapes): tau, per-depth acceptance, DSR,
ESR and prefill share vs visual length, for AR and each speculative method, on held-out scenes of the
tiny video world (test split, never trained on), each asked for a detailed caption
(`world.CAPTION_QUESTIONS[0]`), batch 1.

  python bench/length_sweep.py --draft sparrow=shipped/drafts/sparrow --draft msd=shipped/drafts/msd \\
      --draft pruned=shipped/drafts/pruned_visual --draft eagle=shipped/drafts/eagle --temperatures 0,1 --plot
      (the draft directories as they ship; a method without one can run --random-draft NAME)
  python bench/length_sweep.py --lengths 8,32 --scenes 2 --draft sparrow=shipped/drafts/sparrow   # quick look
  python bench/length_sweep.py --lengths 8 --scenes 1 --max-new-tokens 16 --random-draft sparrow  # smoke test

Methods (name -> decode mode, models/views.py): sparrow and eagle (a plain text-only EAGLE draft) ->
text_only (decode.py --mode sparrow); msd / full_visual -> full_visual; pruned / pruned_visual ->
pruned_visual; ivsb_mid -> ivsb_mid. `--draft NAME=DIR` gives a method its trained draft (ours or EAGLE
format); `--random-draft NAME` runs a random draft of the mode's view instead (lossless, rarely
accepted: a pipeline check, not a result). AR (the target alone) always runs: it is the baseline.

Per scene and temperature: one warm-up run per decoder the first time it meets a (length, temperature)
(compilation excluded), then --repeats timed runs per decoder, alternating AR and the methods so
machine noise hits all alike; the median prefill and decode times are kept. Prefill = target prefill
(plus the draft's prefill for a method), decode = the jitted loop after it, as decode.py --compare-ar
times them; AR runs with the speculative runs' cache capacity. Per (length, method, temperature): tau and
acceptance per depth pooled over every round of every scene (metrics.acceptance_summary), DSR / ESR /
prefill share from the summed times (metrics.speed_summary), whether each T=0 output equals AR's token
for token (it must: otherwise no DSR/ESR is reported and the script exits 1 after writing). At T > 0 the
outputs are different draws of the same law, so DSR/ESR compare time per generated token
(speed_basis "per token").

Videos: durations --lengths seconds, default 8, 32, 96, 256, 1024 s = 128, 512, 1.5k, 4k, 16k visual
tokens at the target's 112 px / 2 fps; room per length for 1.25x the longest reference caption
(--max-new-tokens overrides). Finished scenes are kept in --work (one JSON line per scene and decoder,
keyed by the target's and drafts' weights and the settings), so an interrupted run resumes where it
stopped. Output: one JSON line per (length, method, temperature) in --jsonl with command, machine, date
and versions; a printed table; --plot writes tau and DSR vs visual tokens.

Cost (estimated from component timings on the idle 2-core CPU, fp32, shipped 6 x 256 target, tree 48-5-10,
AR + 4 methods, T=0, default scenes 4/4/2/2/1 — not yet a measured full run; the script prints its run
time): each decoder compiles once per length (~15-20 s, in the warm-up run), then a run costs prefill +
caption decode: ~2-4 s at 8-32 s of video, ~10 s at 256 s, ~60 s at 1024 s (a 16k-token prefill alone is
~50 s). About 5 min per length up to 256 s and ~10 min for the single 1024 s scene (warm-ups included):
~30 min in all; --temperatures 0,1 about doubles it, --repeats N adds (N - 1) runs per decoder and scene.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import environment, parse_draft_args, read_jsonl_by_key, write_jsonl  # noqa: E402

DEFAULT_LENGTHS, DEFAULT_SCENES = "8,32,96,256,1024", "4,4,2,2,1"
DEFAULT_TARGET = HERE.parent / "shipped" / "tiny-qwen2.5-vl"
# Method name -> engine decode mode (views.MODE_VIEW); eagle is a plain text-only draft in Sparrow's mode.
METHOD_MODE = {"sparrow": "text_only", "eagle": "text_only", "msd": "full_visual", "full_visual": "full_visual",
               "pruned": "pruned_visual", "pruned_visual": "pruned_visual", "ivsb_mid": "ivsb_mid"}
WORK_VERSION = 1  # bump when a per-scene record changes meaning


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help=f"HF checkpoint directory of the target (default {DEFAULT_TARGET})")
    ap.add_argument("--config", default=None,
                    help="a config.json for a random-initialised target instead of --target (pipeline checks, tests)")
    ap.add_argument("--tokenizer", default=None, help="directory with tokenizer.json for a --config target")
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=DIR",
                    help=f"a method and its draft directory; NAME in {sorted(METHOD_MODE)}, or NAME:LABEL for another "
                         "draft of that method (e.g. sparrow:mtp_only); repeatable")
    ap.add_argument("--random-draft", action="append", default=[], metavar="NAME[,NAME]",
                    help="methods run with a random draft of their mode's view (lossless, rarely accepted)")
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help="video durations in seconds, comma-separated")
    ap.add_argument("--scenes", default=DEFAULT_SCENES,
                    help="held-out scenes per length (one number for all, or one per length)")
    ap.add_argument("--temperatures", default="0", help="comma-separated; 0 = greedy")
    ap.add_argument("--tree", default="48-5-10", help="draft tree TOTAL-DEPTH-TOPK (EAGLE-2 notation) or chainN")
    ap.add_argument("--trees", default=None, metavar="LEN:TREE,...",
                    help="tree per length, e.g. 8:12-3-4,1024:48-5-10: a length uses the entry at the largest "
                    "LEN at or below it (--tree below the smallest)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default per length: 1.25x the longest reference caption of its scenes, to a multiple of 32")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per decoder and scene (median kept)")
    ap.add_argument("--profile", action="store_true",
                    help="also time one round's draft and verify phases (engine.profile_phases), first scene per length")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attention", choices=["xla", "pallas"], default="xla")
    ap.add_argument("--seed", type=int, default=0, help="sampling key (and random weights' seed)")
    ap.add_argument("--work", default=str(HERE.parent / "runs" / "length_sweep"),
                    help="per-scene results kept here for resuming")
    ap.add_argument("--fresh", action="store_true", help="ignore per-scene results already in --work")
    ap.add_argument("--jsonl", default=str(HERE / "results" / "length_sweep.jsonl"))
    ap.add_argument("--plot", nargs="?", const=str(HERE / "results" / "length_sweep.png"), default=None,
                    metavar="PNG", help="write tau and DSR vs visual tokens (default path bench/results/length_sweep.png)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def check_args(ap, args) -> None:
    """Usage errors from the arguments alone (ap.error exits 2 with the message)."""
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415

    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        scenes = [int(x) for x in args.scenes.split(",")]
        args.temperatures = [float(x) for x in args.temperatures.split(",")]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r} / --scenes {args.scenes!r} / --temperatures {args.temperatures!r}: "
                 "comma-separated numbers expected")
    if len(scenes) == 1:
        scenes *= len(args.lengths)
    if len(scenes) != len(args.lengths) or min(scenes) < 1 or min(args.lengths) < 1:
        ap.error(f"--scenes {args.scenes!r}: one positive count (or one per length); --lengths must be positive")
    args.scenes = dict(zip(args.lengths, scenes))
    if min(args.temperatures) < 0:
        ap.error(f"--temperatures {args.temperatures}: must be >= 0")
    for flag in ("max_new_tokens", "repeats"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} {v}: must be positive")
    if args.target and args.config:
        ap.error("give --target (trained weights) or --config (random init), not both")
    methods = parse_draft_args(ap, args.draft, args.random_draft, sorted(METHOD_MODE))
    args.methods = methods
    try:
        args.tree_default = TreeSpec.parse(args.tree)
        pairs = [p.split(":", 1) for p in args.trees.split(",")] if args.trees else []
        args.tree_by_length = sorted((int(L), TreeSpec.parse(t)) for L, t in pairs)
    except ValueError as e:
        ap.error(f"--tree {args.tree!r} / --trees {args.trees!r}: {e} (LEN:TOTAL-DEPTH-TOPK, e.g. 8:12-3-4)")


def tree_for(args, length: int):
    """The tree of the largest --trees length at or below `length`, else --tree."""
    fit = [t for L, t in args.tree_by_length if L <= length]
    return fit[-1] if fit else args.tree_default


def files_key(files, extra) -> str:
    """Hash of some files' bytes (names included) and a JSON-able `extra`: what keys the per-scene results."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for p in sorted(Path(f) for f in files):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):  # noqa: B023
                h.update(chunk)
    return h.hexdigest()[:16]


def weight_files(d: Path) -> list[Path]:
    return [d / "config.json", *sorted(d.glob("*.safetensors"))] + \
        ([d / "tokenizer.json"] if (d / "tokenizer.json").is_file() else [])


def record_key(r: dict) -> tuple:
    return (r["length"], r["seed"], r["temperature"], r["method"], r["draft_key"], r["tree"], r["max_new_tokens"])


class Decoders:
    """The target, its drafts and the timed runs of one prompt (decode.py --compare-ar's protocol)."""

    def __init__(self, model, drafts: dict, seed: int):
        from flax import nnx  # noqa: PLC0415

        self.model, self.cfg, self.drafts = model, model.cfg, drafts
        self.tgraph, self.tparams = nnx.split(model)
        self.split = {m: nnx.split(d["draft"]) for m, d in drafts.items()}
        self.seed = seed

    def run(self, method: str, prompts, ecfg, sampling=None) -> dict:
        """One timed run: prefill (target; + the draft's for a method) then the decode loop."""
        import jax  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

        from sparrow_jax.decoding import engine as E  # noqa: PLC0415
        from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity  # noqa: PLC0415
        from sparrow_jax.models import registry, target as tg  # noqa: PLC0415

        key = jax.random.key(self.seed)
        t0 = time.perf_counter()
        if method == "ar":
            batch = registry.prepare_batch_for(self.cfg)(prompts, self.cfg)
            tg.check_context(batch, self.cfg.text, ecfg.max_new_tokens)
            capacity = cache_capacity(batch.input_ids_BT.shape[1], ecfg.max_new_tokens, ecfg.cache_slack)
            pre = jax.block_until_ready(tg.prefill(self.tgraph, self.tparams, batch, capacity=capacity,
                                                   m_star=tg.default_m_star(self.cfg.num_layers), impl=ecfg.impl))
            t1 = time.perf_counter()
            res = jax.block_until_ready(ar_generate(
                self.tgraph, self.tparams, pre.cache, pre.last_logits_BV, pre.rope_delta_B, key,
                max_new_tokens=ecfg.max_new_tokens, sampling=sampling, eos_ids=ecfg.eos_ids, impl=ecfg.impl))
            t2 = time.perf_counter()
            out = {"prompt_bucket": int(batch.input_ids_BT.shape[1])}
        else:
            p = E.prepare(self.model, self.drafts[method]["draft"], prompts, ecfg, mode=self.drafts[method]["mode"],
                          split=((self.tgraph, self.tparams), self.split[method]))
            jax.block_until_ready((p.pre, p.dcache))
            t1 = time.perf_counter()
            dgraph, dparams = self.split[method]
            res = jax.block_until_ready(E.speculative_generate(
                self.tgraph, self.tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV,
                p.pre.last_hidden_BD, p.pre.rope_delta_B, key, cfg=ecfg, sampling=sampling))
            t2 = time.perf_counter()
            R = int(res.rounds)
            out = {"prompt_bucket": int(p.batch.input_ids_BT.shape[1]), "accepted": np.asarray(res.accepted_BR)[0, :R].tolist(),
                   "cut": np.asarray(res.cut_BR)[0, :R].tolist()}
        n = int(np.asarray(res.num_tokens_B)[0])
        return {"tokens": np.asarray(res.tokens_BM)[0, :n].tolist(), "prefill_s": t1 - t0, "decode_s": t2 - t1, **out}

    def profile(self, method: str, prompts, ecfg, sampling=None) -> dict:
        from sparrow_jax.decoding import engine as E  # noqa: PLC0415

        d = self.drafts[method]
        p = E.prepare(self.model, d["draft"], prompts, ecfg, mode=d["mode"])
        return E.profile_phases(self.model, d["draft"], p, ecfg, sampling=sampling)


def run_scene(dec: Decoders, methods, prompts, ecfg, repeats: int, cold=(), profile=(), sampling=None) -> dict:
    """AR and `methods` on one prompt: a warm-up run of each decoder in `cold` (compilation), then `repeats`
    alternating timed runs; per decoder the last run's outputs with the median times (and all of them),
    plus engine.profile_phases for the methods in `profile`."""
    import numpy as np  # noqa: PLC0415

    order = ["ar", *methods]
    for m in order:
        if m in cold:
            dec.run(m, prompts, ecfg, sampling)
    runs = {m: [] for m in order}
    for _ in range(repeats):
        for m in order:
            runs[m].append(dec.run(m, prompts, ecfg, sampling))
    out = {}
    for m, rs in runs.items():
        r = dict(rs[-1])
        for k in ("prefill_s", "decode_s"):
            r[k + "_runs"] = [x[k] for x in rs]
            r[k] = float(np.median(r[k + "_runs"]))
        if m in profile:
            r.update(dec.profile(m, prompts, ecfg, sampling))
        out[m] = r
    return out


def summarize(length: int, method: str, temperature: float, recs: list[dict], tree) -> dict:
    """One (length, method, temperature) row from its per-scene records; a method's record carries the AR
    run it was timed against (same scene, same process, alternating runs)."""
    import numpy as np  # noqa: PLC0415

    from sparrow_jax.decoding.metrics import acceptance_summary, speed_summary  # noqa: PLC0415

    ar = "" if method == "ar" else "ar_"
    ar_prefill, ar_decode = sum(r[ar + "prefill_s"] for r in recs), sum(r[ar + "decode_s"] for r in recs)
    row = {"length_s": length, "visual_tokens": recs[0]["visual_tokens"], "method": method,
           "mode": recs[0].get("mode"), "temperature": temperature, "scenes": len(recs),
           "seeds": [r["seed"] for r in recs], "tree": recs[0]["tree"], "max_new_tokens": recs[0]["max_new_tokens"],
           "prompt_tokens": recs[0]["prompt_tokens"], "new_tokens": sum(len(r["tokens"]) for r in recs),
           "ar_prefill_s": ar_prefill, "ar_decode_s": ar_decode}
    if method == "ar":
        return {**row, "tau": 1.0, "acceptance_per_depth": [], "rounds": row["new_tokens"], "identical_to_ar": True,
                "speed_basis": "baseline", **speed_summary(ar_prefill_s=ar_prefill, ar_decode_s=ar_decode,
                                                           spec_prefill_s=ar_prefill, spec_decode_s=ar_decode)}
    accepted = np.concatenate([np.asarray(r["accepted"], np.int64) for r in recs])[None]
    cut = np.concatenate([np.asarray(r["cut"], bool) for r in recs])[None]
    spec_prefill, spec_decode = sum(r["prefill_s"] for r in recs), sum(r["decode_s"] for r in recs)
    row.update(acceptance_summary(accepted, tree.max_draft_tokens, cut), spec_prefill_s=spec_prefill,
               spec_decode_s=spec_decode, draft=recs[0]["draft"], draft_key=recs[0]["draft_key"])
    if temperature == 0:
        mismatched = [r["seed"] for r in recs if not r["identical_to_ar"]]
        row.update(identical_to_ar=not mismatched, mismatched_seeds=mismatched, speed_basis="identical outputs")
    else:  # different draws: the speculative decoder's time for AR's token count at its own rate
        spec_decode = sum(r["decode_s"] * r["ar_new_tokens"] / max(1, len(r["tokens"])) for r in recs)
        row.update(identical_to_ar=None, speed_basis="per token (T > 0: different draws of the same law)")
    sp = speed_summary(ar_prefill_s=ar_prefill, ar_decode_s=ar_decode, spec_prefill_s=spec_prefill,
                       spec_decode_s=spec_decode)
    if row["identical_to_ar"] is False:  # DSR / ESR are defined on identical outputs
        sp.update(DSR=None, ESR=None)
    row.update(sp)
    for k in ("draft_s_per_round", "verify_s_per_round"):
        vals = [r[k] for r in recs if k in r]
        if vals:
            row[k] = float(np.mean(vals))
    return row


def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'len s':>6} {'visual':>7} {'method':>12} {'T':>4} {'scn':>3} {'new':>5} {'tau':>5} {'DSR':>5} "
            f"{'ESR':>5} {'ARpre%':>6} {'=AR':>4}  acceptance per depth")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        same = {True: "yes", False: "NO", None: "n/a"}[r["identical_to_ar"]]
        share = r.get("prefill_share_ar")
        print(f"{r['length_s']:>6} {r['visual_tokens']:>7} {r['method']:>12} {r['temperature']:>4g} {r['scenes']:>3} "
              f"{r['new_tokens']:>5} {fmt(r['tau']):>5} {fmt(r.get('DSR')):>5} {fmt(r.get('ESR')):>5} "
              f"{fmt(None if share is None else 100 * share, '.1f'):>6} {same:>4}  "
              + " ".join("-" if a != a else f"{a:.2f}" for a in r["acceptance_per_depth"]))  # nan: depth not reached


def plot(rows: list[dict], path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = {}
    for r in rows:
        lines.setdefault((r["method"], r["temperature"]), []).append(r)
    for (method, temp), rs in lines.items():
        rs = sorted(rs, key=lambda r: r["visual_tokens"])
        x = [r["visual_tokens"] for r in rs]
        style = dict(marker="o", linestyle="-" if temp == 0 else "--", label=f"{method} (T={temp:g})")
        axes[0].plot(x, [r["tau"] for r in rs], **style)
        axes[1].plot(x, [float("nan") if r.get("DSR") is None else r["DSR"] for r in rs], **style)
    ticks = sorted({r["visual_tokens"] for r in rows})
    for ax, name in zip(axes, ("tau (tokens per verify round)", "DSR (decode speedup vs AR)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t / 1024:g}k" if t >= 1024 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("visual tokens")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("Length sweep on held-out tiny-world scenes (bench/length_sweep.py)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(args, dtype):
    """The target (trained, or random from --config), its codec and world rendering, and the drafts:
    (model, source, codec, world config, target files, key extras, {method: draft info})."""
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.io.draft_checkpoint import import_official  # noqa: PLC0415
    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.models import registry, views  # noqa: PLC0415
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: PLC0415
    from sparrow_jax.synthetic import demo, world as W  # noqa: PLC0415

    if args.config:
        cfg = registry.config_from_dict(*registry.read_config_dict(args.config))
        model = registry.build_target(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype)
        source, tok_dir = f"random init of {args.config} (seed {args.seed})", args.tokenizer
        target_files, target_extra = [Path(args.config)], {"random_init_seed": args.seed}
    else:
        target = Path(args.target or DEFAULT_TARGET)
        if not demo.has_weights(target):
            raise ValueError(f"--target {target}: no config.json + *.safetensors (trained target) there")
        model, source, tok_dir = registry.load_target(target, dtype=dtype), str(target), target
        target_files, target_extra = weight_files(target), {}
    cfg = model.cfg
    codec = load_codec(tok_dir, cfg.text.vocab_size)
    wcfg = demo.target_world(tok_dir)

    drafts = {}
    for name, path in args.methods.items():
        mode = METHOD_MODE[name.partition(":")[0]]  # "sparrow:mtp_only": an ablation draft of the method
        if path is None:  # seeded by the method's name, so a resumed run meets the same draft
            view, seed = views.view_for_mode(mode), args.seed + 1 + sorted(METHOD_MODE).index(name.partition(":")[0])
            draft = SparrowDraft(DraftConfig.for_target(cfg, visual_view=view), rngs=nnx.Rngs(seed), dtype=dtype)
            dsrc, dkey = f"random draft, view {view} (seed {seed})", f"random-{view}-{seed}"
        else:
            draft = import_official(path, target_cfg=cfg, dtype=dtype)
            views.check_draft_view(draft.cfg.visual_view, mode, source=f"--draft {name}={path}")
            dsrc, dkey = str(path), files_key(weight_files(path), {})
        drafts[name] = {"draft": draft, "mode": mode, "source": dsrc, "key": dkey}
    return model, source, codec, wcfg, target_files, target_extra, drafts


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import jax.numpy as jnp  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from sparrow_jax.decoding import engine as E  # noqa: PLC0415
    from sparrow_jax.decoding.metrics import DEFINITIONS  # noqa: PLC0415
    from sparrow_jax.decoding.sampling import SamplingParams  # noqa: PLC0415
    from sparrow_jax.io.hf_checkpoint import CheckpointError  # noqa: PLC0415
    from sparrow_jax.io.vision_inputs import VisionTokenIds  # noqa: PLC0415
    from sparrow_jax.models import target as tg  # noqa: PLC0415
    from sparrow_jax.models.draft import DraftConfigError  # noqa: PLC0415
    from sparrow_jax.models.qwen2_5_vl import ConfigError  # noqa: PLC0415
    from sparrow_jax.synthetic import evaluate as EV, world as W  # noqa: PLC0415

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    try:
        model, source, codec, wcfg, target_files, target_extra, drafts = load(args, dtype)
    except (CheckpointError, ConfigError, DraftConfigError, ValueError, OSError) as e:
        sys.exit(f"length_sweep.py: error: {' '.join(str(e).split())}")
    cfg = model.cfg
    ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)
    dec = Decoders(model, drafts, args.seed)

    settings = {"world": {"height": wcfg.height, "width": wcfg.width, "fps": wcfg.fps}, "question": W.CAPTION_QUESTIONS[0],
                "dtype": args.dtype, "attention": args.attention, "repeats": args.repeats, "seed": args.seed,
                "batch": 1, "v": WORK_VERSION}
    tkey = files_key(target_files, {**target_extra, **settings})
    work = Path(args.work) / f"{tkey}.jsonl"
    work.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and work.exists():
        work.unlink()
    done = read_jsonl_by_key(work, record_key)

    # The plan: per length its scenes, tree and room for the caption; a unit = (length, scene, temperature).
    plan = {}
    for L in args.lengths:
        scenes = {s: W.make_scene(s, L, wcfg) for s in W.split_seeds("test", args.scenes[L])}
        M = args.max_new_tokens or tg.bucket(int(1.25 * max(len(codec.encode(W.caption(sc))) for sc in scenes.values()))
                                             + 1, 32)
        plan[L] = {"scenes": scenes, "tree": tree_for(args, L), "max_new": M}

    def key_of(L, s, T, m):
        dkey = None if m == "ar" else drafts[m]["key"]
        return (L, s, T, m, dkey, str(plan[L]["tree"]), plan[L]["max_new"])

    units = [(L, s, T) for L in args.lengths for s in plan[L]["scenes"] for T in args.temperatures]
    todo = [u for u in units if any(key_of(*u, m) not in done for m in ["ar", *drafts])]
    print(f"[length-sweep] target {source} ({tkey}); methods: ar, " +
          ", ".join(f"{m} ({d['source']})" for m, d in drafts.items()) +
          f"; {len(units)} scene runs, {len(todo)} to do ({len(done)} records kept in {work})", flush=True)
    bar = tqdm(total=len(todo), unit="scene", disable=args.no_progress)
    warmed, t_start, failures = set(), time.perf_counter(), []
    for L, s, T in todo:
        p = plan[L]
        bar.set_description(f"{L} s T={T:g}")
        ecfg = E.EngineConfig(tree=p["tree"], max_new_tokens=p["max_new"],
                              eos_ids=tuple(cfg.eos_token_ids), impl=args.attention)
        prompt = W.chat_prompt(codec, EV.condition_visual(p["scenes"][s], "real", wcfg), W.CAPTION_QUESTIONS[0], ids)
        methods = [m for m in drafts if key_of(L, s, T, m) not in done]  # AR always: the pairing baseline
        cold = [m for m in ["ar", *methods] if (L, T, m) not in warmed]
        try:
            res = run_scene(dec, methods, [prompt], ecfg, args.repeats, cold=cold,
                            profile=[m for m in cold if m != "ar"] if args.profile else (), sampling=SamplingParams(T))
        except ValueError as e:  # context / view / tree refusals from prepare and prefill
            sys.exit(f"length_sweep.py: error: {L} s scene {s}: {e}")
        warmed.update((L, T, m) for m in cold)
        nvis = int(sum(v.num_tokens for v in prompt.visuals))
        with work.open("a") as f:
            for m, r in res.items():
                rec = {"length": L, "seed": s, "temperature": T, "method": m, "mode": None if m == "ar" else drafts[m]["mode"],
                       "draft": None if m == "ar" else drafts[m]["source"], "draft_key": key_of(L, s, T, m)[4],
                       "tree": str(p["tree"]), "max_new_tokens": p["max_new"], "visual_tokens": nvis,
                       "prompt_tokens": len(prompt.input_ids), **r}
                if m != "ar":  # the AR run it was timed against
                    base = res["ar"]
                    rec.update(ar_prefill_s=base["prefill_s"], ar_decode_s=base["decode_s"],
                               ar_new_tokens=len(base["tokens"]), identical_to_ar=r["tokens"] == base["tokens"] if T == 0 else None)
                done[record_key(rec)] = rec
                f.write(json.dumps(rec) + "\n")
        bar.update(1)
    bar.close()

    env, rows = environment(), []
    for L in args.lengths:
        for m in ["ar", *drafts]:
            for T in args.temperatures:
                row = summarize(L, m, T, [done[key_of(L, s, T, m)] for s in plan[L]["scenes"]], plan[L]["tree"])
                row.update(target=source, target_key=tkey, settings=settings)
                rows.append(row)
                write_jsonl(args.jsonl, {**env, "study": "length_sweep", **row, "definitions": DEFINITIONS})
                if row["identical_to_ar"] is False:
                    failures.append(f"{m} at {L} s T=0 differs from AR on scenes {row['mismatched_seeds']}")
    print()
    print_table(rows)
    print(f"[length-sweep] {DEFINITIONS}")
    if args.plot:
        plot(rows, args.plot)
        print(f"[length-sweep] plot: {args.plot}")
    print(f"[length-sweep] wrote {args.jsonl} ({len(rows)} rows; run time {time.perf_counter() - t_start:.1f} s this "
          f"call; per-scene results in {work})")
    if failures:
        print("[length-sweep] MISMATCH: " + "; ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
