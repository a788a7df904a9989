"""One speculative round, piece by piece: the target decode step, the draft step, the verify step, the
draft phase and the whole engine round, vs committed context length (issue 10: the ratio of one target
decode step to one draft step; issue 14: where a round's time goes).

Each piece runs inside one jitted fori_loop at two trip counts; the time per piece is the difference
divided by the extra trips (dispatch, argument flattening and Python excluded: what the engine's own
while_loop pays). Caches hold random K/V up to their committed length (the cost does not depend on
the values); the draft's cache length is the engine's (`engine.draft_positions` for the draft's view on a
prompt of --text-tokens text around V visual tokens): text only = the text and markers, MSD-style = all
of it, pruned = the text and the kept share of the visual tokens.

  ar       the AR baseline's step: one token of `autoregressive.ar_generate` (HI+1 vs LO+1 tokens)
  draft    one draft step of the tree expansion: embed + draft layer(s) over the draft cache (1 query)
           + the target's LM head, log-softmax and top-k (what `engine.build_tree` runs per level)
  verify   the target over the tree's nodes + commit of the accepted path (`engine.verify_phase`)
  phase    `engine.draft_phase`: the catch-up forward over a full pending block + `build_tree`
  round    a whole round of `engine.speculative_loop` (max_new_tokens lo / hi, ms per extra round)

Derived: target step / draft step; the round in AR steps, so that DSR = τ × AR step / round (the decode
speedup a draft accepting τ tokens per round gets at that length); `overhead` = round − phase − verify.

  python bench/round_profile.py                                   # shipped target + shipped Sparrow draft
  python bench/round_profile.py --draft shipped/drafts/msd --lengths 128 4096 16384
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_jsonl  # noqa: E402
from draft_step import synthetic_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PIECES = ("ar", "draft", "verify", "phase", "round")


def shown(path: str) -> str:
    """A path as recorded: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def ratio(a: float, b: float) -> float | None:
    """a / b to 2 decimals; None where b is not a positive time (a too-short loop on a noisy machine)."""
    return round(a / b, 2) if b > 0 else None


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(ROOT / "shipped" / "tiny-qwen2.5-vl"), help="HF checkpoint directory")
    ap.add_argument("--config", default=None, help="a config.json: random target of that config instead of --target")
    ap.add_argument("--draft", default=str(ROOT / "shipped" / "drafts" / "sparrow"),
                    help="draft directory ('' = a random text-only draft of the target)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 4096, 16384], help="visual tokens V")
    ap.add_argument("--text-tokens", type=int, default=170, help="prompt text tokens (the world's caption request: 170)")
    ap.add_argument("--tree", default="chain3", help="TOTAL-DEPTH-TOPK or chainN")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="sizes the caches, as decode.py's")
    ap.add_argument("--trips", type=int, nargs=2, default=[2, 12], metavar=("LO", "HI"),
                    help="fori_loop trip counts of each timed pair (rounds: max_new_tokens scaled alike)")
    ap.add_argument("--repeats", type=int, default=7, help="timed pairs per cell (median kept)")
    ap.add_argument("--jsonl", default=str(RESULTS / "round_profile.jsonl"))
    return ap


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    lo, hi = args.trips
    if not 1 <= lo < hi or args.repeats < 1 or min(args.lengths) < 0:
        raise SystemExit("--trips needs 1 <= LO < HI; --repeats >= 1; --lengths >= 0")

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.decoding import autoregressive, engine  # noqa: PLC0415
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415
    from sparrow_jax.io.draft_checkpoint import import_official  # noqa: PLC0415
    from sparrow_jax.models import attention as attn_lib, registry, target as tg, views  # noqa: PLC0415
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: PLC0415
    from sparrow_jax.models.kv_cache import KVCache, commit  # noqa: PLC0415

    if args.config:
        cfg = registry.config_from_dict(*registry.read_config_dict(args.config))
        target, tsource = registry.build_target(cfg, rngs=nnx.Rngs(0)), f"random init of {args.config}"
    else:
        target, tsource = registry.load_target(args.target), shown(args.target)
    cfg = target.cfg
    if args.draft:
        draft, dsource = import_official(args.draft, target_cfg=cfg), shown(args.draft)
    else:
        draft, dsource = SparrowDraft(DraftConfig.for_target(cfg), rngs=nnx.Rngs(1)), "random text-only draft"
    dcfg = draft.cfg
    tgraph, tparams = nnx.split(target)
    dgraph, dparams = nnx.split(draft)
    spec = TreeSpec.parse(args.tree)
    ecfg = engine.EngineConfig(tree=spec, max_new_tokens=args.max_new_tokens)
    t, B, L, D = cfg.text, 1, ecfg.block, cfg.text.hidden_size
    key = jax.random.key(0)

    def random_cache(layers, kv_heads, head_dim, committed):
        nonlocal key
        cap = autoregressive.cache_capacity(tg.bucket(committed), args.max_new_tokens, ecfg.cache_slack)
        ks, vs = [], []
        for _ in range(layers):
            key, a, b = jax.random.split(key, 3)
            ks.append(jax.random.normal(a, (B, cap, kv_heads, head_dim), jnp.float32))
            vs.append(jax.random.normal(b, (B, cap, kv_heads, head_dim), jnp.float32))
        return KVCache(tuple(ks), tuple(vs), jnp.full((B,), committed, jnp.int32))

    def keep_lengths(new, old):  # commits write, lengths stay: every trip sees the same committed length
        return KVCache(new.k, new.v, old.lengths_B, new.pos_offset_B)

    one_node = jnp.ones((B, 1, 1), bool)
    x_B1 = jnp.ones((B, 1), jnp.int32)
    pend_tok = jnp.ones((B, L), jnp.int32)
    pend_n = jnp.full((B,), L, jnp.int32)
    all_rows = jnp.ones((B,), bool)

    @jax.jit
    def draft_trips(tparams, dparams, dc, h_B1D, n):
        target, draft = nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams)
        mask = attn_lib.MaskSpec(kv_len_B=dc.lengths_B, block_mask_BTN=one_node)

        def body(_, carry):
            tok, h = carry
            out_h, _ = draft(target.embed(tok), h, dc.next_position()[:, None], mask, caches=list(zip(dc.k, dc.v)),
                             impl=ecfg.impl)
            logp = jax.nn.log_softmax(target.logits(out_h).astype(jnp.float32), -1)
            _, top = jax.lax.top_k(logp, spec.top_k)
            return top[:, :, 0].astype(jnp.int32), out_h
        return jax.lax.fori_loop(0, n, body, (x_B1, h_B1D))

    @jax.jit
    def verify_trips(tparams, tc, tree, n):
        target = nnx.merge(tgraph, tparams)

        def body(_, c):
            v, acc = engine.verify_phase(target, c, tree, jnp.zeros((B,), jnp.int32), jax.random.key(0), ecfg)
            return keep_lengths(commit(c, v.block_kv, acc.path_BL, acc.num_accepted_B), c)
        return jax.lax.fori_loop(0, n, body, tc)

    @jax.jit
    def phase_trips(tparams, dparams, dc, pend_h, n):
        target, draft = nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams)

        def body(_, carry):
            c, acc = carry
            c2, tree = engine.draft_phase(target, draft, c, pend_tok, pend_h, pend_n, all_rows, ecfg)
            return keep_lengths(c2, c), acc + tree.tokens_BN.sum()
        return jax.lax.fori_loop(0, n, body, (dc, jnp.int32(0)))

    def timed(fn, *a):
        """Median over --repeats of (time at HI trips − time at LO trips) / (HI − LO), ms."""
        jax.block_until_ready(fn(*a, lo))
        jax.block_until_ready(fn(*a, hi))
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a, lo))
            t1 = time.perf_counter()
            jax.block_until_ready(fn(*a, hi))
            ts.append((time.perf_counter() - t1 - (t1 - t0)) / (hi - lo))
        return float(np.median(ts)) * 1e3

    def ar_ms(tc, last_logits):
        """ms per extra token of the AR baseline's own loop (`autoregressive.ar_generate`, fresh caches)."""
        def run(n):
            fresh = jax.tree.map(jnp.copy, tc)
            jax.block_until_ready(fresh)
            t0 = time.perf_counter()
            jax.block_until_ready(autoregressive.ar_generate(tgraph, tparams, fresh, last_logits, jnp.zeros((B,), jnp.int32),
                                                             jax.random.key(1), max_new_tokens=n, impl=ecfg.impl))
            return time.perf_counter() - t0
        run(lo + 1), run(hi + 1)
        return float(np.median([run(hi + 1) - run(lo + 1) for _ in range(args.repeats)])) / (hi - lo) * 1e3

    def round_ms(tc, dc, last_logits, last_h):
        """ms per extra round of the real loop (random caches: rounds end when max_new_tokens is reached)."""
        def run(mnt):
            c = engine.EngineConfig(tree=spec, max_new_tokens=mnt)
            a, b = jax.tree.map(jnp.copy, tc), jax.tree.map(jnp.copy, dc)
            jax.block_until_ready((a, b))
            t0 = time.perf_counter()
            out = engine.speculative_loop(tgraph, tparams, dgraph, dparams, a, b, last_logits, last_h,
                                          jnp.zeros((B,), jnp.int32), jax.random.key(1), cfg=c)
            jax.block_until_ready(out)
            return time.perf_counter() - t0, int(out.rounds)
        mlo, mhi = lo * spec.max_draft_tokens + 1, hi * spec.max_draft_tokens + 1
        run(mlo), run(mhi)
        per = []
        for _ in range(args.repeats):
            (a_s, a_r), (b_s, b_r) = run(mlo), run(mhi)
            if b_r > a_r:
                per.append((b_s - a_s) / (b_r - a_r))
        return float(np.median(per)) * 1e3 if per else float("nan")

    env = environment()
    records = []
    mode = {view: mode for mode, view in views.MODE_VIEW.items()}[dcfg.visual_view]
    rng = np.random.default_rng(0)
    for V in sorted(args.lengths):
        prompt = synthetic_prompt(args.text_tokens, V, cfg, rng)
        P_t = len(prompt.input_ids)
        P_d = int(engine.draft_positions([prompt], mode, P_t, dcfg.visual_keep_fraction)[1][0])  # the engine's rule
        tc = random_cache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, P_t)
        dc = random_cache(dcfg.num_layers, dcfg.num_key_value_heads, dcfg.head_dim, P_d)
        key, k1, k2 = jax.random.split(key, 3)
        pend_h = jax.random.normal(k1, (B, L, D), jnp.float32)
        logits0 = jax.random.normal(k2, (B, t.vocab_size), jnp.float32)
        tree = jax.jit(lambda tp, dp, c, h: engine.build_tree(nnx.merge(tgraph, tp), nnx.merge(dgraph, dp), c, h,
                                                               pend_tok[:, 0], spec, ecfg.impl))(
            tparams, dparams, dc, pend_h[:, 0])
        print(f"[round-profile] V={V}: target cache {P_t}, draft cache {P_d} ({dcfg.visual_view} view)", flush=True)
        ms = {"ar": ar_ms(tc, logits0),
              "draft": timed(draft_trips, tparams, dparams, dc, pend_h[:, :1]),
              "verify": timed(verify_trips, tparams, tc, tree),
              "phase": timed(phase_trips, tparams, dparams, dc, pend_h),
              "round": round_ms(tc, dc, logits0, pend_h[:, 0])}
        ms = {k: round(v, 4) for k, v in ms.items()}  # the ratios below are those of the recorded times
        rec = {"bench": "round_profile", **env, "target": tsource, "draft": dsource, "draft_view": dcfg.visual_view,
               "lm_layers": t.num_hidden_layers, "hidden": D, "draft_layers": dcfg.num_layers, "tree": str(spec),
               "tree_nodes": spec.total_tokens, "visual_tokens": V, "target_committed": P_t, "draft_committed": P_d,
               "trips": [lo, hi], "repeats": args.repeats,
               **{f"{k}_ms": v for k, v in ms.items()},
               "target_over_draft_step": ratio(ms["ar"], ms["draft"]),
               "verify_over_ar": ratio(ms["verify"], ms["ar"]),
               "round_in_ar_steps": ratio(ms["round"], ms["ar"]),
               "overhead_ms": round(ms["round"] - ms["phase"] - ms["verify"], 4)}
        records.append(rec)
        write_jsonl(args.jsonl, rec)
    hdr = (f"{'V':>6} {'view':<7} {'AR ms':>7} {'draft ms':>8} {'verify ms':>9} {'phase ms':>8} {'round ms':>8} "
           f"{'T/D step':>8} {'verify/AR':>9} {'round/AR':>8} {'overhead':>8}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in records:
        print(f"{r['visual_tokens']:>6} {r['draft_view']:<7} {r['ar_ms']:>7.3f} {r['draft_ms']:>8.3f} "
              f"{r['verify_ms']:>9.3f} {r['phase_ms']:>8.3f} {r['round_ms']:>8.3f} {r['target_over_draft_step']!s:>8} "
              f"{r['verify_over_ar']!s:>9} {r['round_in_ar_steps']!s:>8} {r['overhead_ms']:>8.3f}")
    print("DSR at this length = tau x AR / round = tau / round_in_ar_steps")
    return records


if __name__ == "__main__":
    main()
