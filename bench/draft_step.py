"""Per-round draft cost vs video length: Sparrow `text_only` against `full_visual` (MSD-style) and
`pruned_visual` drafts.

One draft round is timed exactly as `engine.speculative_generate`'s loop body runs it: (1) the draft
catch-up forward over a pending block of depth + 2 (token, target hidden) pairs (up to depth + 1
accepted drafts + the bonus; EAGLE-2 tree notation, see decoding/tree.py), attending to the draft KV
cache, committed with `kv_cache.commit`; (2) `engine.build_tree` (EAGLE-2 expansion: depth draft forwards
over top_k frontier nodes each, plus `select_tree`). Target verification is not part
of it: it is the same for every draft mode.

Models are random (configs/tiny.json target, `Qwen25VL(cfg, rngs=nnx.Rngs(0))`; draft
`SparrowDraft(DraftConfig.for_target(cfg), rngs=nnx.Rngs(1))`): the cost does not depend on the values.
The draft cache is filled with random K/V up to P committed entries, where P and the cache shapes come
from `engine.draft_positions` on a synthetic prompt (text halves around <vision_start> video*V
<vision_end>) and the capacity from `engine.prepare`'s rule:
  text_only     P = text + 2 markers              (independent of V)
  full_visual   P = text + 2 + V
  pruned_visual P = text + 2 + round(keep_fraction * V)
capacity = autoregressive.cache_capacity(bucket(P), max_new_tokens, EngineConfig.cache_slack).

The cache is donated to the jitted round (as in the engine, where the while_loop updates it in place)
and re-created from a template before every call, outside the timed region. Calls of all
(mode, visual length) cells are interleaved repeat by repeat, so machine noise hits every cell alike;
each cell reports the median of --repeats calls after --warmup calls, and its ratio to the same mode at
the smallest visual length (all from this one run).

  python bench/draft_step.py
  python bench/draft_step.py --visual-tokens 512 16384 --tree 60-6-10 --batch 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_jsonl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("text_only", "full_visual", "pruned_visual")


def synthetic_prompt(text_tokens: int, visual_tokens: int, cfg, rng):
    """Token types only matter to `draft_positions`; ids are filled for completeness."""
    half = text_tokens // 2
    text = rng.integers(0, 1000, text_tokens).tolist()
    ids = (text[:half] + [cfg.vision_start_token_id] + [cfg.video_token_id] * visual_tokens
           + [cfg.vision_end_token_id] + text[half:])
    tt = [0] * (half + 1) + [2] * visual_tokens + [0] * (1 + text_tokens - half)
    return types.SimpleNamespace(input_ids=np.asarray(ids), mm_token_type_ids=np.asarray(tt), visuals=())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "tiny.json"))
    ap.add_argument("--visual-tokens", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    ap.add_argument("--text-tokens", type=int, default=128, help="text tokens of the prompt (excl. vision markers)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--keep-fraction", type=float, default=0.25, help="visual tokens kept by pruned_visual")
    ap.add_argument("--tree", default="48-5-10", help="TOTAL-DEPTH-TOPK in EAGLE-2's notation (paths hold up to "
                    "DEPTH+1 drafts); paper's Qwen2.5-VL setting: 48-5-10")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pending", type=int, default=None,
                    help="pending pairs per row in the catch-up block (default depth + 2, the worst case)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="only sizes the cache capacity")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-donate", action="store_true", help="do not donate the cache (commit then copies it)")
    ap.add_argument("--impl", default="xla", choices=["xla", "pallas"])
    ap.add_argument("--jsonl", default=str(RESULTS / "draft_step.jsonl"))
    ap.add_argument("--plot", default=str(RESULTS / "draft_step.png"), help="PNG path ('' = none)")
    args = ap.parse_args(argv)

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.decoding.autoregressive import cache_capacity  # noqa: PLC0415
    from sparrow_jax.decoding.engine import EngineConfig, draft_phase, draft_positions  # noqa: PLC0415
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: PLC0415
    from sparrow_jax.models.kv_cache import KVCache  # noqa: PLC0415
    from sparrow_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig  # noqa: PLC0415

    spec = TreeSpec.parse(args.tree)
    ecfg = EngineConfig(tree=spec, max_new_tokens=args.max_new_tokens, impl=args.impl)
    L = ecfg.block
    pending = L if args.pending is None else args.pending
    if not 1 <= pending <= L:
        ap.error(f"--pending must be in [1, {L}]")
    cfg = Qwen25VLConfig.from_hf_dict(json.loads(Path(args.config).read_text()))
    target = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    dcfg = DraftConfig.for_target(cfg)
    draft = SparrowDraft(dcfg, rngs=nnx.Rngs(1))
    tgraph, tparams = nnx.split(target)
    dgraph, dparams = nnx.split(draft)
    B, D = args.batch, cfg.text.hidden_size

    def one_round(tgraph, tparams, dgraph, dparams, dcache, pend_tok, pend_h, pend_n, *, spec, impl):
        """The draft half of one engine round (`engine.draft_phase`: catch-up + tree), all rows active."""
        target, draft = nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams)
        ecfg = EngineConfig(tree=spec, max_new_tokens=1, impl=impl)
        active = jnp.ones(pend_n.shape, bool)
        dcache, tree = draft_phase(target, draft, dcache, pend_tok, pend_h, pend_n, active, ecfg)
        return tree, dcache

    static = ("tgraph", "dgraph", "spec", "impl")
    round_jit = jax.jit(one_round, static_argnames=static,
                        **({} if args.no_donate else {"donate_argnames": ("dcache",)}))

    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    k1, k2, key = jax.random.split(key, 3)
    pend_tok = jax.random.randint(k1, (B, L), 0, cfg.text.vocab_size - 8, jnp.int32)
    pend_h = jax.random.normal(k2, (B, L, D), jnp.float32)
    pend_n = jnp.full((B,), pending, jnp.int32)

    cells = []
    for mode in args.modes:
        for V in sorted(args.visual_tokens):
            prompt = synthetic_prompt(args.text_tokens, V, cfg, rng)
            idx, dlen, _ = draft_positions([prompt] * B, mode, len(prompt.input_ids), args.keep_fraction)
            capacity = cache_capacity(idx.shape[1], args.max_new_tokens, ecfg.cache_slack)
            shape = (B, capacity, dcfg.num_key_value_heads, dcfg.head_dim)
            ks, vs = [], []
            for _ in range(dcfg.num_layers):
                key, a, b = jax.random.split(key, 3)
                ks.append(jax.random.normal(a, shape, jnp.float32))
                vs.append(jax.random.normal(b, shape, jnp.float32))
            template = KVCache(tuple(ks), tuple(vs), dlen.astype(jnp.int32))
            cells.append(dict(mode=mode, visual_tokens=V, P=int(dlen[0]), P_bucket=int(idx.shape[1]),
                              capacity=capacity, template=template, times=[]))

    def call(cell):
        fresh = jax.tree.map(jnp.copy, cell["template"])
        jax.block_until_ready(fresh)
        t0 = time.perf_counter()
        out = round_jit(tgraph, tparams, dgraph, dparams, fresh, pend_tok, pend_h, pend_n, spec=spec,
                        impl=args.impl)
        jax.block_until_ready(out)
        return time.perf_counter() - t0, out

    t_start = time.perf_counter()
    for cell in cells:  # compile (shapes repeat across text_only cells: one compile serves them all)
        first, out = call(cell)
        cell["first_call_s"] = round(first, 3)
        tree, dc = out
        assert int(dc.lengths_B[0]) == cell["P"] + pending, "catch-up did not commit the pending block"
        cell["tree_tokens"] = int(tree.tokens_BN.shape[1])
    for _ in range(args.warmup):
        for cell in cells:
            call(cell)
    for _ in range(args.repeats):  # interleaved: every cell sees the same machine conditions
        for cell in cells:
            cell["times"].append(call(cell)[0])
    total_s = time.perf_counter() - t_start

    env = environment()
    base = {}
    for cell in cells:
        t = np.asarray(cell["times"]) * 1e3
        cell["median_ms"] = float(np.median(t))
        cell["p25_ms"], cell["p75_ms"] = (float(x) for x in np.percentile(t, [25, 75]))
        cell["min_ms"] = float(t.min())
        base.setdefault(cell["mode"], cell["median_ms"])  # cells are sorted by V within a mode
        cell["ratio"] = cell["median_ms"] / base[cell["mode"]]

    smallest = min(args.visual_tokens)
    print(f"\ndraft round (catch-up of {pending} pairs + build_tree {spec}), B={B}, text={args.text_tokens}, "
          f"{'no donation' if args.no_donate else 'cache donated'}; median of {args.repeats} "
          f"(after {args.warmup} warmup), ratio = median / same mode at V={smallest}")
    hdr = f"{'mode':<14} {'visual':>7} {'P':>6} {'capacity':>8} {'median ms':>10} {'p25-p75 ms':>15} {'ratio':>6}"
    print(hdr)
    print("-" * len(hdr))
    for c in cells:
        print(f"{c['mode']:<14} {c['visual_tokens']:>7} {c['P']:>6} {c['capacity']:>8} {c['median_ms']:>10.3f} "
              f"{c['p25_ms']:>7.3f}-{c['p75_ms']:<7.3f} {c['ratio']:>6.3f}")
    print(f"(total {total_s:.1f} s incl. compiles)\n")

    common = {
        "bench": "draft_step", **env, "config": Path(args.config).name, "dtype": "float32", "impl": args.impl,
        "tree": str(spec), "max_draft_tokens": spec.max_draft_tokens, "batch": B, "text_tokens": args.text_tokens,
        "pending": pending,
        "keep_fraction": args.keep_fraction, "max_new_tokens": args.max_new_tokens, "donated": not args.no_donate,
        "warmup": args.warmup, "repeats": args.repeats,
        "draft": {"layers": dcfg.num_layers, "hidden": dcfg.hidden_size, "kv_heads": dcfg.num_key_value_heads,
                  "head_dim": dcfg.head_dim},
    }
    for c in cells:
        rec = {**common, "mode": c["mode"], "visual_tokens": c["visual_tokens"], "P": c["P"],
               "P_bucket": c["P_bucket"], "capacity": c["capacity"], "tree_tokens": c["tree_tokens"],
               "median_ms": round(c["median_ms"], 4), "p25_ms": round(c["p25_ms"], 4),
               "p75_ms": round(c["p75_ms"], 4), "min_ms": round(c["min_ms"], 4),
               "first_call_s (compile+run)": c["first_call_s"],
               f"ratio_vs_{smallest}": round(c["ratio"], 4)}
        print(json.dumps(rec))
        write_jsonl(args.jsonl, rec)

    if args.plot:
        try:
            import matplotlib  # noqa: PLC0415

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
            return
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for mode in args.modes:
            cs = [c for c in cells if c["mode"] == mode]
            x = [c["visual_tokens"] for c in cs]
            ax1.errorbar(x, [c["median_ms"] for c in cs], marker="o", label=mode,
                         yerr=[[c["median_ms"] - c["p25_ms"] for c in cs], [c["p75_ms"] - c["median_ms"] for c in cs]])
            ax2.plot(x, [c["ratio"] for c in cs], marker="o", label=mode)
        ax2.axhline(1.1, color="gray", ls="--", lw=1, label="1.1 (text_only bound)")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("visual tokens in the prompt")
            ax.grid(alpha=0.3)
            ax.legend()
        ax1.set_ylabel("draft round time (ms, median, p25-p75)")
        ax2.set_ylabel(f"ratio to same mode at {smallest} visual tokens")
        fig.suptitle(f"Draft round (catch-up + tree {spec}), B={B}, tiny config, {env['machine'].split(',')[0]}, "
                     f"{env['backend']}", fontsize=9)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
