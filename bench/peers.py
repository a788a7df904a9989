"""Peers on the same work (issue 11 §5, issue 14's bench/peers.py): our AR and our speculative decoders
against transformers (torch, CPU) on the same prompts and videos, in one run, so every ratio compares
numbers measured side by side on the same machine state.

  python bench/peers.py --lengths 8,32 --scenes 2                      # shipped target + shipped drafts
  python bench/peers.py --lengths 8,32,256 --scenes 2 --hf-shaped      # + a 7B-head-shaped random checkpoint
  python bench/peers.py --fast --target DIR --random-draft sparrow     # smoke test (tests/test_peers.py)

Methods (per target; one warm-up run of each on the first scene of a length, excluded from timing, then
--repeats timed runs alternating the methods so machine noise hits all alike, median kept):
  hf_generate   transformers `Qwen2_5_VLForConditionalGeneration.from_pretrained(dir)` greedy `generate`
  hf_lookup     transformers assisted generation with prompt-lookup decoding
                (`generate(..., prompt_lookup_num_tokens=K)`): no second model needed
  hf_assistant  transformers assisted generation, `assistant_model=` the target's own first
                --assistant-layers LM layers (same vision tower, embeddings, norm and head: the only same-vocab
                video assistant there is here; not trained to stand alone); transformers' defaults
                (20 candidate tokens, confidence threshold 0.4)
  ar            ours: the jitted AR path (decode.py --mode ar)
  sparrow, msd  ours: speculative decoding with a draft (decode.py --mode sparrow / full_visual), tree from
                the draft's tree_choice.json (decode.py --tree auto) or --tree for a random draft
Inputs: held-out scenes of the tiny video world (test split, never trained on), rendered, passed through
the mp4 codec and preprocessed at the target's 112 px / 2 fps (8 s = 128 visual tokens, 32 s = 512,
256 s = 4k, 1024 s = 16k), asked for a detailed caption. transformers gets exactly our preprocessed
arrays (input_ids, attention_mask, mm_token_type_ids, pixel_values_videos, video_grid_thw,
second_per_grid_ts). Greedy, fp32, batch 1, EOS off on both sides so every run makes exactly
--max-new-tokens tokens.

Times: prefill = from the call until the target's first forward returns (transformers: a forward hook;
it includes the vision tower, and for assisted generation the assistant's prefill and the first verify;
ours: input batching, vision tower, target prefill and a draft's prefill); decode = the rest. tokens/s:
decode = new tokens / decode s, end-to-end = new tokens / (prefill + decode) s. tokens per target call:
transformers = new tokens / target forwards; ours = tau. Checks: ours AR vs transformers greedy
(first mismatch reported: fp32 numerics may differ at near-ties), transformers assisted == transformers
greedy, ours speculative == ours AR (must: otherwise the script exits 1 after writing).

--hf-shaped also writes (save_pretrained, temp dir) a random Qwen2.5-VL with 7B-shaped attention
(3 LM layers, hidden 256, 2 heads, 1 KV head, head_dim 128, M-RoPE 16/24/24, a 2-block vision tower)
with the shipped tokenizer and measures hf_generate, hf_lookup and ar on it (no trained draft exists
for it; a random model's greedy text repeats, so prompt lookup there is not a fair measure of anything).
No resume store: ratios are only meaningful within one process's run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import environment, parse_draft_args, write_jsonl  # noqa: E402

DEFAULT_TARGET = HERE.parent / "shipped" / "tiny-qwen2.5-vl"
SHIPPED_DRAFTS = {"sparrow": HERE.parent / "shipped" / "drafts" / "sparrow",
                  "msd": HERE.parent / "shipped" / "drafts" / "msd"}
HF_METHODS = ("hf_generate", "hf_lookup", "hf_assistant")
HF_ASSISTED = ("hf_lookup", "hf_assistant")
DRAFT_METHODS = ("sparrow", "msd")  # names of bench/length_sweep.METHOD_MODE
# 7B-shaped attention at toy depth/width (Qwen2.5-VL-7B: head_dim 128, M-RoPE 16/24/24, GQA).
HF_SHAPED = {
    "text_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 65536,
                    "initializer_range": 0.05,  # wider greedy margins than 0.02 (fewer fp32 near-ties)
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 256,
                      "fullatt_block_indexes": [1], "tokens_per_second": 2},
}
FAST = {"lengths": [4], "scenes": 1, "max_new_tokens": 8}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None,
                    help=f"HF Qwen2.5-VL checkpoint directory (default {DEFAULT_TARGET.relative_to(HERE.parent)})")
    ap.add_argument("--hf-shaped", action="store_true",
                    help="also measure a random 7B-head-shaped checkpoint written by save_pretrained (AR vs generate)")
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=DIR",
                    help=f"a speculative method and its draft, NAME in {DRAFT_METHODS} (default for the shipped "
                    "target: "
                    "the shipped sparrow and msd drafts)")
    ap.add_argument("--random-draft", action="append", default=[], metavar="NAME",
                    help="a method run with a random draft of its view (lossless, rarely accepted)")
    ap.add_argument("--lengths", default="8,32,256", help="video durations in seconds, comma-separated")
    ap.add_argument("--scenes", type=int, default=2, help="held-out scenes per length")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method and scene (median kept)")
    ap.add_argument("--tree", default="6-2-2", help="tree for a random draft (a trained one uses its tree_choice.json)")
    ap.add_argument("--lookup-tokens", type=int, default=10,
                    help="prompt_lookup_num_tokens for hf_lookup (transformers' documented example value; 0 = off)")
    ap.add_argument("--assistant-layers", type=int, default=2,
                    help="LM layers of the target kept in the hf_assistant model (0 = off)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: on a 2-core machine shared with other jobs, torch's "
                    "OpenMP workers spin-wait for a descheduled peer, and 2 threads measured 0.8-2.6 tokens/s "
                    "against 147-177 with 1 on the shipped target; 0 = torch's own default)")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds of rest (after a garbage collection) before every timed run, ours and theirs alike: "
                         "a run right after another library's kept hitting its slow tail (a 256 s prefill 1.09 vs "
                         "1.36-1.49 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true",
                    help=f"smoke test: lengths {FAST['lengths']}, {FAST['scenes']} scene, "
                    f"{FAST['max_new_tokens']} new tokens")
    ap.add_argument("--jsonl", default=str(HERE / "results" / "peers.jsonl"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def check_args(ap, args) -> None:
    """Usage errors from the arguments alone (ap.error exits 2 with the message)."""
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415

    if args.fast:
        args.lengths, args.scenes, args.max_new_tokens = ",".join(map(str, FAST["lengths"])), FAST["scenes"], \
            FAST["max_new_tokens"]
    try:
        args.lengths = [int(x) for x in str(args.lengths).split(",")]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r}: comma-separated whole seconds expected")
    for flag in ("scenes", "max_new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if min(args.lengths) < 1:
        ap.error(f"--lengths {args.lengths}: must be positive")
    for flag in ("lookup_tokens", "assistant_layers"):
        if getattr(args, flag) < 0:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0 (0 = off)")
    try:
        args.tree = TreeSpec.parse(args.tree)
    except ValueError as e:
        ap.error(f"--tree {args.tree!r}: {e}")
    drafts = parse_draft_args(ap, args.draft, args.random_draft, DRAFT_METHODS)
    target = Path(args.target) if args.target else DEFAULT_TARGET
    if not (target / "config.json").is_file():
        ap.error(f"--target {target}: no config.json there (a HF checkpoint directory is expected)")
    if not args.draft and not args.random_draft and target.resolve() == DEFAULT_TARGET.resolve():
        drafts = {n: p for n, p in SHIPPED_DRAFTS.items() if (p / "config.json").is_file()}
    args.target, args.methods = target, drafts


# ------------------------------------------------------------------------------------ transformers side


def hf_inputs(prompt) -> dict:
    """transformers kwargs for one prompt (batch 1) from our preprocessed arrays, nothing recomputed."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    T = len(prompt.input_ids)
    kw = {"input_ids": torch.tensor(prompt.input_ids[None], dtype=torch.long),
          "attention_mask": torch.ones(1, T, dtype=torch.long),
          # without it transformers silently uses 1-D positions (SPEC §4)
          "mm_token_type_ids": torch.tensor(prompt.mm_token_type_ids[None], dtype=torch.long)}
    for kind, pix, grid in (("image", "pixel_values", "image_grid_thw"),
                            ("video", "pixel_values_videos", "video_grid_thw")):
        vs = [v for v in prompt.visuals if v.kind == kind]
        if vs:
            kw[pix] = torch.tensor(np.concatenate([v.pixel_values for v in vs]))
            kw[grid] = torch.tensor([v.grid_thw for v in vs], dtype=torch.long)
    vids = [v for v in prompt.visuals if v.kind == "video"]
    if vids:
        kw["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in vids], dtype=torch.float32)
    return kw


class HFPeer:
    """The target in transformers (fp32, eval) and its assistants; `run` times one generate call."""

    def __init__(self, path, *, lookup_tokens: int, assistant_layers: int):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

        transformers.utils.logging.set_verbosity_error()  # the assistant's load report lists the dropped layers
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.stamps: list[float] = []
        self.model.register_forward_hook(lambda *_: self.stamps.append(time.perf_counter()))
        self.lookup_tokens, self.assistant, self.methods = lookup_tokens, None, ["hf_generate"]
        self.assistant_desc = {}
        if lookup_tokens:
            self.methods.append("hf_lookup")
            self.assistant_desc["hf_lookup"] = f"prompt lookup, prompt_lookup_num_tokens={lookup_tokens}"
        L = self.model.config.text_config.num_hidden_layers
        if 0 < assistant_layers < L:
            cfg = Qwen2_5_VLConfig.from_pretrained(path)
            cfg.text_config.num_hidden_layers = assistant_layers
            self.assistant = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, config=cfg,
                                                                                 dtype=torch.float32).eval()
            self.methods.append("hf_assistant")
            self.assistant_desc["hf_assistant"] = (
                f"assistant_model = the target's first {assistant_layers} of {L} LM layers (same vision tower, "
                "embeddings, norm, head; untrained as a stand-alone model); transformers' default candidate "
                "schedule")

    def run(self, method: str, prompt, max_new_tokens: int) -> dict:
        import torch  # noqa: PLC0415

        extra = {"hf_generate": {}, "hf_lookup": {"prompt_lookup_num_tokens": self.lookup_tokens},
                 "hf_assistant": {"assistant_model": self.assistant}}[method]
        kw = hf_inputs(prompt)
        self.stamps.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**kw, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
        t2 = time.perf_counter()
        t1 = self.stamps[0]
        return {"tokens": out[0, len(prompt.input_ids):].tolist(), "prefill_s": t1 - t0, "decode_s": t2 - t1,
                "target_calls": len(self.stamps)}


def write_hf_shaped(path, like, seed: int) -> Path:
    """HF_SHAPED with `like`'s vocabulary, special ids and tokenizer/preprocessor files, random weights,
    written by transformers' save_pretrained (so the world prompts of `like` apply unchanged)."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    base = json.loads((Path(like) / "config.json").read_text())
    d = copy.deepcopy(HF_SHAPED)
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        d[k] = base[k]
    d["tie_word_embeddings"] = False
    d["text_config"].update(vocab_size=base["text_config"]["vocab_size"],
                            eos_token_id=base["text_config"].get("eos_token_id"))
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**d)).eval().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "video_preprocessor_config.json"):
        if (Path(like) / name).is_file():
            shutil.copy(Path(like) / name, Path(path) / name)
    return Path(path)


# --------------------------------------------------------------------------------------------- one target


def first_mismatch(a: list, b: list):
    """First position where two token lists differ (None when equal)."""
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if a == b else i


def run_target(name: str, path: Path, methods: dict, args, bar) -> list[dict]:
    """Every method on every (length, scene) of one target; one summary row per (length, method)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import length_sweep as LS  # noqa: PLC0415 — its loader and timed runs (decode.py --compare-ar's protocol)
    from sparrow_jax.decoding import engine as E, tree_choice  # noqa: PLC0415
    from sparrow_jax.io.vision_inputs import VisionTokenIds  # noqa: PLC0415
    from sparrow_jax.synthetic import evaluate as EV, world as W  # noqa: PLC0415

    ns = SimpleNamespace(target=str(path), config=None, tokenizer=None, seed=args.seed, methods=methods)
    model, source, codec, wcfg, _, _, drafts = LS.load(ns, jnp.float32)
    cfg = model.cfg
    dec = LS.Decoders(model, drafts, args.seed)
    hf = HFPeer(path, lookup_tokens=args.lookup_tokens,
                assistant_layers=args.assistant_layers if name == "target" else 0)
    ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)
    order = [*hf.methods, "ar", *drafts]
    recs = {}  # (length, method) -> per-scene records
    for L in args.lengths:
        prompts = {s: W.chat_prompt(codec, EV.condition_visual(W.make_scene(s, L, wcfg), "real", wcfg),
                                    W.CAPTION_QUESTIONS[0], ids) for s in W.split_seeds("test", args.scenes)}
        nvis = tree_choice.visual_tokens(next(iter(prompts.values())))
        trees = {m: (args.tree if methods[m] is None else
                     tree_choice.auto_tree(methods[m], nvis, jax.default_backend())[0]) for m in drafts}
        ecfgs = {m: E.EngineConfig(tree=trees.get(m, args.tree), max_new_tokens=args.max_new_tokens, eos_ids=(),
                                   impl="xla") for m in ["ar", *drafts]}  # greedy: Decoders.run's sampling=None

        def run(m, prompt):
            gc.collect()
            time.sleep(args.settle)
            if m in HF_METHODS:
                return hf.run(m, prompt, args.max_new_tokens)
            return dec.run(m, [prompt], ecfgs[m])

        for i, (s, prompt) in enumerate(prompts.items()):
            bar.set_description(f"{name} {L} s scene {s}")
            if i == 0:  # warm-up: compilation (ours), first-call set-up (torch)
                for m in order:
                    run(m, prompt)
            runs = {m: [] for m in order}
            for _ in range(args.repeats):
                for m in order:
                    runs[m].append(run(m, prompt))
            for m, rs in runs.items():
                r = dict(rs[-1])
                for k in ("prefill_s", "decode_s"):
                    r[k + "_runs"] = [x[k] for x in rs]
                    r[k] = float(np.median(r[k + "_runs"]))
                r.update(seed=s, visual_tokens=nvis, prompt_tokens=len(prompt.input_ids),
                         tree=str(trees[m]) if m in trees else None)
                recs.setdefault((L, m), []).append(r)
            bar.update(1)
    return [summarize(name, source, L, m, recs, hf, drafts) for L in args.lengths for m in order]


def summarize(target: str, source: str, L: int, m: str, recs: dict, hf: HFPeer, drafts: dict) -> dict:
    """One (target, length, method) row from its per-scene records, with the checks against the
    reference outputs of the same scenes and the ratios to the transformers rows of the same run."""
    import numpy as np  # noqa: PLC0415

    from sparrow_jax.decoding.metrics import acceptance_summary  # noqa: PLC0415
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415

    rs = recs[(L, m)]
    new = sum(len(r["tokens"]) for r in rs)
    pre, dec = sum(r["prefill_s"] for r in rs), sum(r["decode_s"] for r in rs)
    row = {"target": target, "target_dir": source, "length_s": L, "visual_tokens": rs[0]["visual_tokens"],
           "prompt_tokens": rs[0]["prompt_tokens"], "method": m, "scenes": len(rs), "seeds": [r["seed"] for r in rs],
           "new_tokens": new, "prefill_s": pre / len(rs), "decode_s": dec, "decode_tokens_per_s": new / dec,
           "e2e_tokens_per_s": new / (pre + dec), "prefill_s_runs": [r["prefill_s_runs"] for r in rs],
           "decode_s_runs": [r["decode_s_runs"] for r in rs], "tokens": [r["tokens"] for r in rs]}

    def against(ref: str) -> dict:
        mis = [(r["seed"], first_mismatch(r["tokens"], q["tokens"])) for r, q in zip(rs, recs[(L, ref)])]
        bad = [{"seed": s, "position": p} for s, p in mis if p is not None]
        return {"identical": not bad, "first_mismatch": bad}

    if m in HF_METHODS:
        row.update(implementation="transformers", tokens_per_target_call=new / sum(r["target_calls"] for r in rs),
                   assistant=hf.assistant_desc.get(m))
        if m in HF_ASSISTED:
            row["vs_hf_generate"] = against("hf_generate")
    else:
        row["implementation"] = "ours (jax)"
        if m == "ar":
            row.update(tokens_per_target_call=1.0, vs_hf_generate=against("hf_generate"))
        else:
            acc = acceptance_summary(np.concatenate([np.asarray(r["accepted"], np.int64) for r in rs])[None],
                                     TreeSpec.parse(rs[0]["tree"]).max_draft_tokens,
                                     np.concatenate([np.asarray(r["cut"], bool) for r in rs])[None])
            row.update(acc, tokens_per_target_call=acc["tau"], tree=rs[0]["tree"], draft=drafts[m]["source"],
                       mode=drafts[m]["mode"], vs_ours_ar=against("ar"))
    return row



def add_ratios(rows: list[dict]) -> None:
    """Per (target, length): ours AR against transformers greedy generate, and each of our speculative
    methods against the fastest transformers assisted generation of the same run (decode tokens/s),
    as {"vs", "decode", "e2e", "prefill"}: our tokens/s over theirs, their prefill s over ours (> 1:
    ours is faster in all three)."""
    by = {(r["target"], r["length_s"], r["method"]): r for r in rows}
    for r in rows:
        if r["implementation"] == "transformers":
            continue
        group = [by[(r["target"], r["length_s"], m)] for m in HF_ASSISTED if (r["target"], r["length_s"], m) in by]
        ref = (by[(r["target"], r["length_s"], "hf_generate")] if r["method"] == "ar" or not group
               else max(group, key=lambda q: q["decode_tokens_per_s"]))
        r["ratio"] = {"vs": ref["method"], "decode": r["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
                      "e2e": r["e2e_tokens_per_s"] / ref["e2e_tokens_per_s"],
                      "prefill": ref["prefill_s"] / r["prefill_s"]}


def print_table(rows: list[dict]) -> None:
    head = (f"{'target':>9} {'len s':>5} {'visual':>6} {'method':>12} {'new':>4} {'prefill s':>9} {'dec tok/s':>9} "
            f"{'e2e tok/s':>9} {'tok/call':>8} {'same':>5}  {'ratio vs':>12} {'dec x':>6} {'e2e x':>6} {'pre x':>6}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        check = r.get("vs_ours_ar") or r.get("vs_hf_generate")
        same = "-" if check is None else "yes" if check["identical"] else \
            "@" + ",".join(str(b["position"]) for b in check["first_mismatch"])
        q = r.get("ratio")
        ratio = (f"{q['vs']:>12} {q['decode']:>6.2f} {q['e2e']:>6.2f} {q['prefill']:>6.2f}" if q else "")
        print(f"{r['target']:>9} {r['length_s']:>5} {r['visual_tokens']:>6} {r['method']:>12} {r['new_tokens']:>4} "
              f"{r['prefill_s']:>9.3f} {r['decode_tokens_per_s']:>9.1f} {r['e2e_tokens_per_s']:>9.1f} "
              f"{r['tokens_per_target_call']:>8.2f} {same:>5}  {ratio}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    env = {**environment(), "torch": torch.__version__, "transformers": transformers.__version__,
           "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0]}
    settings = {"max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "dtype": "float32", "greedy": True,
                "eos": "off (exactly max_new_tokens tokens)", "batch": 1, "lookup_tokens": args.lookup_tokens,
                "assistant_layers": args.assistant_layers, "settle_s": args.settle, "question": None}
    targets = [("target", args.target, args.methods)]
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        if args.hf_shaped:
            targets.append(("hf-shaped", write_hf_shaped(Path(tmp) / "hf-shaped", args.target, args.seed), {}))
        print(f"[peers] targets: " + "; ".join(f"{n} {p} (methods: hf_generate"
                                               f"{', hf_lookup' if args.lookup_tokens else ''}"
                                               f"{', hf_assistant' if n == 'target' and args.assistant_layers else ''}"
                                               f", ar{''.join(', ' + m for m in ms)})" for n, p, ms in targets) +
              f"; lengths {args.lengths} s, {args.scenes} scene(s), {args.max_new_tokens} new tokens; torch threads "
              f"{env['torch_threads']}", flush=True)
        bar = tqdm(total=len(targets) * len(args.lengths) * args.scenes, unit="scene", disable=args.no_progress)
        t0, rows = time.perf_counter(), []
        for name, path, methods in targets:
            rows += run_target(name, path, methods, args, bar)
        bar.close()
    add_ratios(rows)
    env["load_average_end"] = os.getloadavg()[0]  # 1-minute load: how shared the machine was
    from sparrow_jax.synthetic import world as W  # noqa: PLC0415

    settings["question"] = W.CAPTION_QUESTIONS[0]
    for r in rows:
        write_jsonl(args.jsonl, {**env, "study": "peers", **settings, **r})
    print()
    print_table(rows)
    print("[peers] prefill s: per scene; tok/s: new tokens over decode (dec) or prefill + decode (e2e) time; tok/call: "
          "new tokens per target forward (ours speculative: tau); same: identical to the reference (ar: "
          "transformers greedy; hf assisted: transformers greedy; ours speculative: ours AR) or @first mismatch; "
          "x: ours / theirs (prefill: theirs / ours)")
    print(f"[peers] wrote {args.jsonl} ({len(rows)} rows; run time {time.perf_counter() - t0:.0f} s; 1-minute load "
          f"average {env['load_average_start']:.1f} at the start, {env['load_average_end']:.1f} at the end)")
    bad = [f"{r['target']} {r['length_s']} s {r['method']}" for r in rows
           if r.get("vs_ours_ar") and not r["vs_ours_ar"]["identical"]]
    if bad:
        print(f"[peers] MISMATCH: speculative output differs from ours AR: {'; '.join(bad)}", file=sys.stderr)
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
