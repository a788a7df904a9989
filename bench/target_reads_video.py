"""Does the target read the video? Held-out world scenes (test split), each asked for a detailed caption
and one question per kind (colour, shape, motion, count, time, event, order of appearance), with the
real video and with two controls: a blank video and the same frames in a shuffled temporal order
(`world.ablate`). Answers are greedy (our AR path, batched; one prefill per video shared by its
questions) and scored against the scene graph by the world's scorer. A target that reads the video
scores clearly higher with the real video than with either control; shuffling keeps colours and
shapes but breaks motion, events, their order and times.

  python bench/target_reads_video.py --target shipped/tiny-qwen2.5-vl
  python bench/target_reads_video.py --target DIR --lengths 8 --scenes 8      # quick look

Default sizes (held-out scenes per length, each shown under the 3 conditions): 8 s (128 visual tokens)
x 32, 32 s (512 tokens, the longest training clips) x 16, 256 s (4k) x 8, 1024 s (16k, the longest
shipped length) x 4. Estimated on the idle 2-core CPU from per-video costs: ~1 min for 8 s, ~1 min for
32 s, ~3 min for 256 s and ~15 min for 1024 s (per video a ~35 s prefill of 16k
visual tokens and a caption of up to ~380 tokens at ~0.1 s each; its questions share the prefill).
Finished videos are kept in --work (one JSON line each, keyed by the target's weights and the
settings), so an interrupted run resumes where it stopped; `--lengths 8,32,256` leaves the long group
out. Results: one JSON line in --jsonl with command, machine, date and versions, and a printed table.
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

from common import environment, read_jsonl_by_key, write_jsonl  # noqa: E402

DEFAULT_LENGTHS, DEFAULT_SCENES = "8,32,256,1024", "32,16,8,4"
CAPTION_COLUMNS = ("colour", "shape", "motion", "count", "event", "order", "time", "well_formed")
QA_COLUMNS = ("colour", "shape", "motion", "count", "time", "event", "object")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="HF checkpoint directory of the target (with tokenizer.json)")
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help="video durations in seconds, comma-separated")
    ap.add_argument("--scenes", default=DEFAULT_SCENES,
                    help="held-out scenes per length (one number for all, or one per length)")
    ap.add_argument("--conditions", default="real,blank,shuffled", help="videos shown: real, blank, shuffled")
    ap.add_argument("--batch-tokens", type=int, default=16384,
                    help="visual tokens per prefill batch (rows = this / a video's tokens, 1..--max-batch)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--work", default=str(HERE.parent / "runs" / "target_reads_video"),
                    help="per-video results kept here for resuming")
    ap.add_argument("--fresh", action="store_true", help="ignore per-video results already in --work")
    ap.add_argument("--jsonl", default=str(HERE / "results" / "target_reads_video.jsonl"))
    ap.add_argument("--examples", type=int, default=1, help="example captions printed per length and condition")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        scenes = [int(x) for x in args.scenes.split(",")]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r} / --scenes {args.scenes!r}: comma-separated integers expected")
    if len(scenes) == 1:
        scenes *= len(args.lengths)
    if len(scenes) != len(args.lengths) or min(scenes) < 1 or min(args.lengths) < 4:
        ap.error(f"--scenes {args.scenes!r} must give one positive count (or one per length), lengths >= 4 s")
    args.scenes = dict(zip(args.lengths, scenes))
    args.conditions = args.conditions.split(",")
    if not set(args.conditions) <= {"real", "blank", "shuffled"}:
        ap.error(f"--conditions {args.conditions}: choose from real, blank, shuffled")
    return args


def fingerprint(target: Path, settings: dict) -> str:
    """Key of the per-video results: the target's weights and config and the settings that change answers."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        with open(target / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):  # noqa: B023
                h.update(chunk)
    return h.hexdigest()[:16]


def fmt(s, key):
    v = s.get(key)
    return "   -" if v is None else f"{v['mean']:4.2f}"


def print_table(results: dict) -> None:
    head = (f"{'length':>9} {'video':>8} | caption {'overall':>11} " + " ".join(f"{c[:6]:>6}" for c in CAPTION_COLUMNS) +
            f" | answers {'overall':>11} " + " ".join(f"{c[:6]:>6}" for c in QA_COLUMNS))
    print(head + "\n" + "-" * len(head))
    for length, by_cond in results.items():
        for cond, s in by_cond.items():
            c, q = s["caption"], s["qa"]
            ov, qo = c["overall"], s["qa_overall"]
            print(f"{length:>9} {cond:>8} | {ov['mean']:4.2f} ± {ov['stderr']:4.2f}       " +
                  " ".join(f"{fmt(c, k):>6}" for k in CAPTION_COLUMNS) +
                  f" | {qo['mean']:4.2f} ± {qo['stderr']:4.2f}       " + " ".join(f"{fmt(q, k):>6}" for k in QA_COLUMNS))
    print("caption columns: world.score_caption components (mean over the videos where the scorer could check "
          "them; 'order' needs two matched events; 'well_f' = share of clauses that are the world's own caption "
          "clauses, not in overall: a degenerate caption can still state the facts); answers: world.score_answer accuracy per question kind "
          "('object' = which appears first / last); ± = standard error.")


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm  # noqa: PLC0415

    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.models import registry, target as tg  # noqa: PLC0415
    from sparrow_jax.synthetic import evaluate as EV  # noqa: PLC0415
    from sparrow_jax.synthetic import world as W  # noqa: PLC0415
    from sparrow_jax.synthetic import demo  # noqa: PLC0415

    target = Path(args.target)
    if not (target / "model.safetensors").is_file() or not (target / "tokenizer.json").is_file():
        sys.exit(f"target_reads_video.py: error: {target}: needs model.safetensors and tokenizer.json")
    model = registry.load_target(target)
    codec = load_codec(target, model.cfg.text.vocab_size)
    asker = EV.Asker(model, codec)
    wcfg = demo.target_world(target)
    settings = {"world": {"height": wcfg.height, "width": wcfg.width, "fps": wcfg.fps,
                          **({k: getattr(wcfg, k) for k in W.SCENE_FIELDS} if wcfg != W.WorldConfig() else {})}, "kinds": EV.QA_KINDS,
                "qa_max_new": EV.QA_MAX_NEW, "caption_max_new": "bucket32(1.25 * longest reference)", "v": 1}
    key = fingerprint(target, settings)
    work = Path(args.work) / f"{key}.jsonl"
    work.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and work.exists():
        work.unlink()
    done = read_jsonl_by_key(work, lambda r: (r["length"], r["seed"], r["condition"]))
    plan = {L: [(s, c) for s in W.split_seeds("test", args.scenes[L]) for c in args.conditions] for L in args.lengths}
    todo = sum((L, s, c) not in done for L, rows in plan.items() for s, c in rows)
    print(f"[reads-video] target {target} ({key}); {sum(map(len, plan.values()))} videos, {todo} to run "
          f"({len(done)} kept in {work})", flush=True)
    bar = tqdm(total=todo, unit="video", disable=args.no_progress)
    t_start, elapsed = time.perf_counter(), {}
    for L, rows in plan.items():
        t0 = time.perf_counter()
        scenes = {s: W.make_scene(s, L, wcfg) for s, _ in rows}
        items = {s: EV.scene_items(sc) for s, sc in scenes.items()}
        longest = max(len(codec.encode(it[0].answer)) for it in items.values())
        cap_new = tg.bucket(int(1.25 * longest) + 1, 32)
        per_batch = max(1, min(args.max_batch, args.batch_tokens // wcfg.visual_tokens(L)))
        pending = [(s, c) for s, c in rows if (L, s, c) not in done]
        per_batch = min(per_batch, max(1, len(pending)))
        J = 1 + max(len(it) - 1 for it in items.values())
        bar.set_description(f"{L} s")
        for i in range(0, len(pending), per_batch):
            chunk = pending[i:i + per_batch]
            padded = chunk + [chunk[-1]] * (per_batch - len(chunk))  # one compiled shape per length
            visuals = [EV.condition_visual(scenes[s], c, wcfg) for s, c in padded]
            qs = [[q.question for q in items[s]] + [items[s][-1].question] * (J - len(items[s])) for s, _ in padded]
            answers = asker.answer(visuals, qs, [cap_new] + [EV.QA_MAX_NEW] * (J - 1))
            for (s, c), ans in zip(chunk, answers):
                texts = [asker.text(a) for a in ans[:len(items[s])]]
                rec = {"length": L, "seed": s, "condition": c, "visual_tokens": wcfg.visual_tokens(L),
                       **EV.score_video(scenes[s], items[s], texts)}
                done[(L, s, c)] = rec
                with work.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update(len(chunk))
        elapsed[L] = time.perf_counter() - t0
    bar.close()
    results, examples = {}, {}
    for L, rows in plan.items():
        results[L] = {c: EV.summarize([done[(L, s, c)] for s, cc in rows if cc == c]) for c in args.conditions}
        examples[L] = {c: [{"seed": s, "caption": done[(L, s, c)]["caption"]["text"],
                            "truth": done[(L, s, c)]["caption"]["truth"]}
                           for s, cc in rows if cc == c][:args.examples] for c in args.conditions}
    for L in args.lengths:
        print(f"\n== {L} s ({wcfg.visual_tokens(L)} visual tokens), {args.scenes[L]} held-out scenes ==")
        for c in args.conditions:
            for ex in examples[L][c]:
                print(f"[{c}] seed {ex['seed']}: {ex['caption']}")
        print(f"[truth]: {examples[L][args.conditions[0]][0]['truth']}" if args.examples else "")
    print()
    print_table(results)
    rec = {**environment(), "target": str(target), "target_key": key, "settings": settings,
           "scenes": args.scenes, "conditions": args.conditions, "results": results, "examples": examples,
           "seconds_per_length": {L: round(elapsed.get(L, 0.0), 1) for L in args.lengths},
           "total_s": round(time.perf_counter() - t_start, 1)}
    write_jsonl(args.jsonl, rec)
    print(f"\n[reads-video] wrote {args.jsonl} (run time {rec['total_s']} s this call; per-video results in {work})")
    return results


if __name__ == "__main__":
    main()
