"""Decode-step roofline: per-step time of the target's AR decode step and verify step vs committed
context length, beside the step's floor on this machine (issue 14).

What is timed — the engine's own functions, not copies:
  ar      `autoregressive.ar_generate` (the jitted `ar_loop` decode.py runs in AR mode), greedy, no EOS:
          one step = `target.verify_fn` over a one-node block + `kv_cache.commit`, inside the while_loop.
          Per step = (t(n) - t(1)) / (n - 1): a run of max_new_tokens=n makes n - 1 forwards (the last
          token needs none), and t(1) (no forward at all) removes the loop's fixed cost and the dispatch.
  verify  `engine.verify_phase` (`target.verify_fn` over the tree under its ancestor mask + greedy
          acceptance) + `kv_cache.commit` of the accepted path: the target half of one
          `speculative_loop` round, run R times in a jitted fori_loop; per round = (t(R) - t(0)) / R.
The target is random-initialised (timing does not depend on the values); the vision tower, which no
decode step touches, is cut to one block to save memory. The cache holds random K/V, filled to the
committed length P inside the capacity decode.py gives it: cache_capacity(bucket(P), --max-new-tokens,
cache slack of the largest --trees) for AR and every tree alike (decode.py's AR run takes the
speculative run's capacity). `--probe-capacity` adds cells with P = the smallest length inside each
larger length's capacity: does a step cost grow with P or with the capacity?

The floor of a step: max(bytes / stream bandwidth, FLOPs / matmul rate), both rates measured in this run.
  bytes = the LM's weights a step reads (decoder layers, final norm, LM head; the embedding table is
          only gathered from) + K/V of the P committed entries of every layer (nothing past P need be read).
  FLOPs = 2 * nodes * (weight matmul parameters) + 4 * nodes * heads * head_dim * (P + nodes) per layer.
  stream bandwidth = the faster of a jitted sum over --stream-mib MiB and a matrix-vector product over
          a matrix of that size (both read every byte once); matmul rate = a square --matmul-n fp32 GEMM.
Both rates are probed before the cells and again after every repeat; the floor uses the best seen (on a
shared machine a probe can catch a busy moment, which would lower the floor). The ratio time / floor is the headline (1.0 = at the hardware limit).  Weights that fit in the caches
(tiny configs: ~25 MB vs a 32 MB L3) can run below the DRAM floor: read the ratio at long contexts.

Cells are interleaved repeat by repeat (noise hits all alike); each reports the median of --repeats.

  python bench/roofline.py                                    # tiny config, 0.5k .. 32k
  python bench/roofline.py --configs configs/qwen2_5_vl_7b.json@2 --lengths 512 2048 8192
  python bench/roofline.py --lengths 1024 8192 --probe-capacity
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median_time, peak_rss_gib, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]


def parse_config_spec(spec: str):
    """'PATH' or 'PATH@LAYERS' (LM depth override) -> (path, layers or None)."""
    path, sep, layers = spec.partition("@")
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise SystemExit(f"--configs {spec!r}: no such config file (a config.json or a model directory)")
    if sep and not (layers.isdigit() and int(layers) >= 1):
        raise SystemExit(f"--configs {spec!r}: LAYERS after '@' must be a positive integer")
    return p, (int(layers) if sep else None)


def load_config(path: Path, layers: int | None):
    """The family config with the LM depth overridden and the vision tower cut to one block."""
    from sparrow_jax.models.qwen2_5_vl import Qwen25VLConfig  # noqa: PLC0415

    d = json.loads(path.read_text())
    if d.get("model_type") != "qwen2_5_vl":
        raise SystemExit(f"{path}: model_type {d.get('model_type')!r}; the roofline runs qwen2_5_vl targets")
    if layers is not None:
        d["text_config"]["num_hidden_layers"] = layers
    d["vision_config"].update(depth=1, fullatt_block_indexes=[0])  # unused by decode steps: save memory
    return Qwen25VLConfig.from_hf_dict(d, source=str(path))


def step_cost(params, cfg, nodes: int, committed: int, batch: int):
    """(bytes read, FLOPs) of one target step over `nodes` new tokens at `committed` cached entries."""
    import jax  # noqa: PLC0415

    t = cfg.text
    lm = params["model"]
    layers_bytes = sum(x.nbytes for x in jax.tree.leaves(lm["layers"])) + sum(x.nbytes for x in jax.tree.leaves(lm["norm"]))
    head = params["lm_head"] if params.get("lm_head") is not None else lm["embed_tokens"]
    head_bytes = sum(x.nbytes for x in jax.tree.leaves(head))
    itemsize = jax.tree.leaves(lm["layers"])[0].dtype.itemsize
    kv_bytes = 2 * t.num_hidden_layers * batch * committed * t.num_key_value_heads * t.head_dim * itemsize
    matmul_params = sum(x.size for x in jax.tree.leaves(lm["layers"]) if x.ndim == 2) + t.hidden_size * t.vocab_size
    attn_flops = 4 * nodes * t.num_attention_heads * t.head_dim * (committed + nodes) * t.num_hidden_layers
    flops = batch * (2 * nodes * matmul_params + attn_flops)
    return dict(weight_bytes=layers_bytes + head_bytes, kv_bytes=kv_bytes, flops=flops)


def measure_rates(stream_mib: int, matmul_n: int, repeats: int) -> dict:
    """Streaming-read bandwidth (bytes/s) and fp32 matmul rate (FLOP/s) of this machine, now."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    cols = 8192
    rows = stream_mib * 2**20 // (4 * cols)
    x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
    v = jnp.ones((rows,), jnp.float32)
    sum_jit, matvec_jit = jax.jit(jnp.sum), jax.jit(lambda v, x: v @ x)
    t_sum = median_time(lambda: sum_jit(x), repeats)
    t_mv = median_time(lambda: matvec_jit(v, x), repeats)
    del x
    a = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.float32)
    mm_jit = jax.jit(lambda a, b: a @ b)
    t_mm = median_time(lambda: mm_jit(a, a), repeats)
    nbytes = rows * cols * 4
    return dict(sum_bytes_per_s=nbytes / t_sum, matvec_bytes_per_s=nbytes / t_mv,
                stream_bytes_per_s=max(nbytes / t_sum, nbytes / t_mv), matmul_flops_per_s=2 * matmul_n**3 / t_mm,
                stream_mib=stream_mib, matmul_n=matmul_n)


def synthetic_tree(spec, batch: int, rng):
    """A tree of spec's shape from an EAGLE-2-like pool (cumulative log-probs, so parents outrank their
    children and every selected node's parent is selected), through `tree.select_tree`."""
    import jax.numpy as jnp  # noqa: PLC0415

    from sparrow_jax.decoding.tree import select_tree  # noqa: PLC0415

    K, D = spec.top_k, spec.max_draft_tokens
    P = spec.pool_size
    tok = rng.integers(0, 1000, (batch, P))
    score = np.zeros((batch, P), np.float32)
    parent = np.full((batch, P), -1, np.int64)
    depth = np.ones((batch, P), np.int64)
    score[:, :K] = -np.sort(rng.exponential(1.0, (batch, K)), axis=1)
    front = np.tile(np.arange(K), (batch, 1))
    for s in range(2, D + 1):
        at = K + (s - 2) * K * K
        for b in range(batch):
            cum = (score[b, front[b]][:, None] - rng.exponential(1.0, (K, K))).reshape(-1)
            score[b, at:at + K * K] = cum
            parent[b, at:at + K * K] = np.repeat(front[b], K)
            depth[b, at:at + K * K] = s
            front[b] = at + np.argsort(-cum)[:K]
    root = rng.integers(0, 1000, (batch,))
    return select_tree(jnp.asarray(root, jnp.int32), jnp.asarray(tok, jnp.int32), jnp.asarray(score),
                       jnp.asarray(parent, jnp.int32), jnp.asarray(depth, jnp.int32), spec)


def run(args) -> list[dict]:
    """All cells of one invocation -> the records (also written to --jsonl)."""

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax import runtime  # noqa: PLC0415
    from sparrow_jax.decoding import autoregressive, engine  # noqa: PLC0415
    from sparrow_jax.decoding.tree import TreeSpec  # noqa: PLC0415
    from sparrow_jax.models import kv_cache, target as tg  # noqa: PLC0415
    from sparrow_jax.models.attention import (CPU_KERNEL_MAX_ROWS, DECODE_KV_BLOCK,  # noqa: PLC0415
                                              GEMM_MAX_COLUMNS, WHOLE_CACHE_FILL, AttentionImpl)
    from sparrow_jax.models.qwen2_5_vl import Qwen25VL  # noqa: PLC0415

    impls = {(cb, gc, wf, kr): AttentionImpl(args.impl, cache_block=cb, gemm_columns=gc, whole_cache_fill=wf,
                                             cpu_kernel_rows=kr)
             for cb in (args.cache_blocks or [DECODE_KV_BLOCK]) for gc in (args.gemm_columns or [GEMM_MAX_COLUMNS])
             for wf in (args.whole_cache_fill or [WHOLE_CACHE_FILL])
             for kr in (args.cpu_kernel_rows if args.cpu_kernel_rows is not None else [CPU_KERNEL_MAX_ROWS])}
    trees = [TreeSpec.parse(t) for t in args.trees]
    pins = [p == "on" for p in dict.fromkeys(args.pin_workers)]
    slack = max([engine.EngineConfig(tree=t, max_new_tokens=args.max_new_tokens).cache_slack for t in trees] + [1])
    if args.ar_steps + 1 > args.max_new_tokens or args.verify_rounds * max([t.max_draft_tokens for t in trees] + [0]) > slack + args.max_new_tokens:
        raise SystemExit("--ar-steps / --verify-rounds must fit the cache's room (--max-new-tokens + slack)")

    @runtime.graph_jit(graphs=("tgraph",), static_argnames=("tgraph", "cfg"), donate_argnames=("tcache",))
    def verify_rounds(tgraph, tparams, tcache, tree, rope_delta_B, key, rounds, *, cfg):
        """`rounds` target halves of an engine round: verify_phase + commit of the accepted path."""
        target = nnx.merge(tgraph, tparams)

        def body(_, c):
            v, acc = engine.verify_phase(target, c, tree, rope_delta_B, key, cfg)
            return kv_cache.commit(c, v.block_kv, acc.path_BL, acc.num_accepted_B)

        return jax.lax.fori_loop(0, rounds, body, tcache)

    print(f"[roofline] measuring stream bandwidth ({args.stream_mib} MiB) and matmul rate ({args.matmul_n}^3)",
          flush=True)
    env = environment()  # first: it pins the CPU workers the probes and cells run on
    rates = measure_rates(args.stream_mib, args.matmul_n, max(3, args.repeats))
    import cpu_kernels  # noqa: PLC0415

    cpu_kernel_loaded, why = cpu_kernels.load()
    if not cpu_kernel_loaded:
        print(f"[roofline] CPU kernel not loaded ({why}): cells with cpu_kernel_rows > 0 run the XLA path", flush=True)
    print(f"[roofline] stream {rates['stream_bytes_per_s'] / 1e9:.1f} GB/s (sum {rates['sum_bytes_per_s'] / 1e9:.1f},"
          f" matvec {rates['matvec_bytes_per_s'] / 1e9:.1f}), matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s",
          flush=True)
    records, probes = [], [dict(rates)]
    for spec_str in args.configs:
        path, layers = parse_config_spec(spec_str)
        cfg = load_config(path, layers)
        model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
        tgraph, tparams = nnx.split(model)
        t = cfg.text
        B = args.batch
        name = path.parent.name if path.name == "config.json" else path.stem
        name += f"@{cfg.num_layers}L" if layers is not None else ""
        key = jax.random.key(0)
        rng = np.random.default_rng(0)
        cells = []
        shapes = [(P, P) for P in sorted(args.lengths)]
        if args.probe_capacity:
            shapes += [(min(args.lengths), P) for P in sorted(args.lengths) if P > min(args.lengths)]
        for committed, cap_for in shapes:
            capacity = autoregressive.cache_capacity(tg.bucket(cap_for), args.max_new_tokens, slack)
            shape = (B, capacity, t.num_key_value_heads, t.head_dim)
            ks, vs = [], []
            for _ in range(t.num_hidden_layers):
                key, a, b = jax.random.split(key, 3)
                ks.append(jax.random.normal(a, shape, jnp.float32))
                vs.append(jax.random.normal(b, shape, jnp.float32))
            template = kv_cache.KVCache(tuple(ks), tuple(vs), jnp.full((B,), committed, jnp.int32))
            for ((cb, gc, wf, kr), impl), pin in itertools.product(impls.items(), pins):
                base = dict(committed=committed, capacity=capacity, template=template, cache_block=cb,
                            gemm_columns=gc, whole_cache_fill=wf, cpu_kernel_rows=kr, impl=impl, pinned=pin)
                cells.append(dict(base, step="ar", nodes=1, tree=None))
                for spec in trees:
                    cells.append(dict(base, step="verify", nodes=spec.total_tokens, tree=str(spec),
                                      tree_obj=synthetic_tree(spec, B, rng),
                                      ecfg=engine.EngineConfig(tree=spec, max_new_tokens=args.max_new_tokens,
                                                               impl=impl)))
        logits0 = jax.random.normal(key, (B, t.vocab_size), jnp.float32)
        rope_delta = jnp.zeros((B,), jnp.int32)

        def call(cell, n):
            """One timed call: n AR tokens (n - 1 forwards) or n verify rounds; the cache is fresh."""
            runtime.pin_cpu_workers() if cell["pinned"] else runtime.release_cpu_workers()
            fresh = jax.tree.map(jnp.copy, cell["template"])
            jax.block_until_ready(fresh)
            t0 = time.perf_counter()
            if cell["step"] == "ar":
                out = autoregressive.ar_generate(tgraph, tparams, fresh, logits0, rope_delta, jax.random.key(1),
                                                 max_new_tokens=n, impl=cell["impl"])
                jax.block_until_ready(out)
                assert int(out.num_tokens_B[0]) == n and int(out.cache.lengths_B[0]) == cell["committed"] + n - 1
            else:
                out = verify_rounds(tgraph, tparams, fresh, cell["tree_obj"], rope_delta, jax.random.key(1),
                                    jnp.int32(n), cfg=cell["ecfg"])
                jax.block_until_ready(out)
                assert int(out.lengths_B[0]) >= cell["committed"] + n
            return time.perf_counter() - t0

        def counts(cell):
            return (1, 1 + args.ar_steps) if cell["step"] == "ar" else (0, args.verify_rounds)

        t_start = time.perf_counter()
        for i, cell in enumerate(cells):  # compile + warm up
            lo, hi = counts(cell)
            cell["first_call_s"] = round(call(cell, lo) + call(cell, hi), 3)
            print(f"[roofline] {name}: compiled {cell['step']} {cell['tree'] or ''} P={cell['committed']} "
                  f"cache_block={cell['cache_block']} gemm_columns={cell['gemm_columns']} "
                  f"whole_cache_fill={cell['whole_cache_fill']:.3g} cpu_kernel_rows={cell['cpu_kernel_rows']} "
                  f"cap={cell['capacity']} ({i + 1}/{len(cells)}, {cell['first_call_s']} s)", flush=True)
            cell["lo"], cell["hi"] = [], []
        for r in range(args.repeats):  # interleaved: every cell sees the same machine conditions
            for cell in cells:
                lo, hi = counts(cell)
                cell["lo"].append(call(cell, lo))
                cell["hi"].append(call(cell, hi))
            again = measure_rates(args.stream_mib, args.matmul_n, 3)  # a shared machine: keep the best seen
            probes.append(again)
            for k in ("sum_bytes_per_s", "matvec_bytes_per_s", "stream_bytes_per_s", "matmul_flops_per_s"):
                rates[k] = max(rates[k], again[k])
            print(f"[roofline] {name}: repeat {r + 1}/{args.repeats} ({time.perf_counter() - t_start:.0f} s)", flush=True)

        common = {"bench": "roofline", **env, "config": name, "config_path": str(path), "lm_layers": t.num_hidden_layers,
                  "hidden": t.hidden_size, "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads,
                  "head_dim": t.head_dim, "vocab": t.vocab_size, "dtype": "float32", "impl": args.impl, "code": args.label, "batch": B,
                  "max_new_tokens": args.max_new_tokens, "cache_slack": slack, "repeats": args.repeats,
                  "ar_fn": f"{autoregressive.ar_generate.__module__}.{autoregressive.ar_generate.__qualname__}",
                  "verify_fn": f"{engine.verify_phase.__module__}.{engine.verify_phase.__qualname__}",
                  **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in rates.items()},
                  "stream_probes_gb_per_s": [round(p["stream_bytes_per_s"] / 1e9, 2) for p in probes],
                  "matmul_probes_gflop_per_s": [round(p["matmul_flops_per_s"] / 1e9, 1) for p in probes]}
        for cell in cells:
            lo, hi = counts(cell)
            per = (np.asarray(cell["hi"]) - np.asarray(cell["lo"])) / (hi - lo)
            cost = step_cost(tparams, cfg, cell["nodes"], cell["committed"], B)
            mem_s = (cost["weight_bytes"] + cost["kv_bytes"]) / rates["stream_bytes_per_s"]
            flop_s = cost["flops"] / rates["matmul_flops_per_s"]
            floor = max(mem_s, flop_s)
            step_ms = float(np.median(per)) * 1e3
            rec = {**common, "cache_block": cell["cache_block"], "gemm_columns": cell["gemm_columns"],
                   "whole_cache_fill": round(cell["whole_cache_fill"], 4), "cpu_kernel_rows": cell["cpu_kernel_rows"],
                   "cpu_kernel": cell["cpu_kernel_rows"] > 0 and cpu_kernel_loaded, "workers_pinned": cell["pinned"],
                   "step": cell["step"], "tree": cell["tree"],
                   "nodes": cell["nodes"],
                   "committed": cell["committed"], "capacity": cell["capacity"],
                   "probe": cell["capacity"] != autoregressive.cache_capacity(tg.bucket(cell["committed"]),
                                                                              args.max_new_tokens, slack),
                   "step_ms": round(step_ms, 4), "step_p25_ms": round(float(np.percentile(per, 25)) * 1e3, 4),
                   "step_p75_ms": round(float(np.percentile(per, 75)) * 1e3, 4),
                   "runs": [lo, hi], "fixed_ms": round(float(np.median(cell["lo"])) * 1e3, 4),
                   **cost, "memory_floor_ms": round(mem_s * 1e3, 4), "flop_floor_ms": round(flop_s * 1e3, 4),
                   "floor_ms": round(floor * 1e3, 4), "bound": "memory" if mem_s >= flop_s else "compute",
                   "ratio": round(step_ms / (floor * 1e3), 3), "first_call_s (compile+run)": cell["first_call_s"],
                   "peak_rss_gib": round(peak_rss_gib(), 2)}
            records.append(rec)
            write_jsonl(args.jsonl, rec)
        ar = {(variant(r), r["committed"]): r["step_ms"] for r in records
              if r["config"] == name and r["step"] == "ar" and not r["probe"]}
        for r in records:
            if r["config"] == name and not r["probe"] and (variant(r), r["committed"]) in ar:
                r["vs_ar"] = round(r["step_ms"] / ar[variant(r), r["committed"]], 3)
        del model, tparams, cells
    return records


def variant(r) -> tuple:
    """The attention settings a record was timed with (older records have no gemm_columns / whole_cache_fill /
    cpu_kernel_rows / workers_pinned)."""
    return (r.get("cache_block"), r.get("gemm_columns"), r.get("whole_cache_fill"), r.get("cpu_kernel_rows"),
            r.get("workers_pinned"))


def variant_label(v) -> str:
    cb, gc, wf, kr, pin = v
    return (f"chunk {cb}" + (f", GEMM <= {gc} cols" if gc is not None else "")
            + (f", whole from {wf:.2g}" if wf is not None else "")
            + (f", CPU kernel <= {kr} rows" if kr else "") + (", workers free" if pin is False else ""))


def print_table(records):
    hdr = (f"{'config':<18} {'step':<13} {'chunk':>5} {'gemm':>5} {'krows':>5} {'pin':>4} {'P':>6} {'cap':>6} {'ms':>9} {'floor ms':>9} {'bound':>7} "
           f"{'ratio':>6} {'vs AR':>6}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in records:
        step = r["step"] if r["step"] == "ar" else f"v {r['tree']}"
        vs = f"{r['vs_ar']:.2f}" if "vs_ar" in r else ""
        print(f"{r['config']:<18} {step:<13} {r.get('cache_block', ''):>5} {r.get('gemm_columns', ''):>5} {r.get('cpu_kernel_rows', ''):>5} {'-' if r.get('workers_pinned') is None else 'on' if r['workers_pinned'] else 'off':>4} {r['committed']:>6} {r['capacity']:>6} {r['step_ms']:>9.3f} "
              f"{r['floor_ms']:>9.3f} {r['bound']:>7} {r['ratio']:>6.2f} {vs:>6}" + ("  (probe)" if r["probe"] else ""))


def plot(records, path):
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        plot_pil(records, path)
        return
    configs = list(dict.fromkeys(r["config"] for r in records))
    fig, axes = plt.subplots(2, len(configs), figsize=(5 * len(configs), 7.5), squeeze=False)
    for j, name in enumerate(configs):
        rs = [r for r in records if r["config"] == name and not r["probe"]]
        steps = list(dict.fromkeys((r["step"], r["tree"], variant(r)) for r in rs))
        several = len({cb for _, _, cb in steps}) > 1
        for k, (step, tree, cb) in enumerate(steps):
            cs = sorted((r for r in rs if (r["step"], r["tree"], variant(r)) == (step, tree, cb)),
                        key=lambda r: r["committed"])
            x = [r["committed"] for r in cs]
            label = ("AR step" if step == "ar" else f"verify {tree}") + (f", {variant_label(cb)}" if several else "")
            line, = axes[0, j].plot(x, [r["step_ms"] for r in cs], marker="o", label=label)
            axes[0, j].plot(x, [r["floor_ms"] for r in cs], ls="--", color=line.get_color(), lw=1,
                            label=f"{label} floor")
            axes[1, j].plot(x, [r["ratio"] for r in cs], marker="o", label=label)
        for cb in dict.fromkeys(variant(r) for r in rs):
            probe = sorted((r for r in records if r["config"] == name and r["probe"] and r["step"] == "ar"
                            and variant(r) == cb), key=lambda r: r["capacity"])
            if probe:
                axes[0, j].plot([r["capacity"] for r in probe], [r["step_ms"] for r in probe], marker="x", ls=":",
                                label=f"AR step, P={probe[0]['committed']}, x = capacity"
                                      + (f", {variant_label(cb)}" if several else ""))
        axes[0, j].set_yscale("log")
        axes[0, j].set_ylabel("ms per step (median)")
        axes[0, j].set_title(f"{name} (L={rs[0]['lm_layers']}, D={rs[0]['hidden']}, KV heads {rs[0]['kv_heads']})",
                             fontsize=9)
        axes[1, j].axhline(1.0, color="gray", lw=1)
        axes[1, j].set_ylabel("time / floor")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("committed context length P")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    r0 = records[0]
    fig.suptitle(f"Decode-step roofline, {r0['machine'].split(',')[0]}, {r0['backend']}, {r0['date']}: stream "
                 f"{r0['stream_bytes_per_s'] / 1e9:.1f} GB/s, matmul {r0['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_pil(records, path):
    """The same two rows of panels drawn with Pillow (no matplotlib in this environment): log-log
    ms per step (solid) and floor (dashed) vs P, and time / floor vs P (log x)."""
    try:
        from PIL import Image, ImageDraw  # noqa: PLC0415
    except ImportError:
        print("neither matplotlib nor Pillow installed: no plot", file=sys.stderr)
        return
    configs = list(dict.fromkeys(r["config"] for r in records))
    W, H, M = 520, 330, 58  # panel size and margin
    img = Image.new("RGB", (W * len(configs), 2 * H + 24), "white")
    d = ImageDraw.Draw(img)
    r0 = records[0]
    d.text((8, 4), f"Decode-step roofline, {r0['machine'].split(',')[0]}, {r0['date']}: stream "
                   f"{r0['stream_bytes_per_s'] / 1e9:.1f} GB/s, matmul {r0['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s",
           fill="black")
    for j, name in enumerate(configs):
        rs = [r for r in records if r["config"] == name and not r["probe"]]
        steps = list(dict.fromkeys((r["step"], r["tree"], variant(r)) for r in rs))
        xs = sorted({r["committed"] for r in rs})
        lx0, lx1 = math.log2(xs[0]) - 0.3, math.log2(xs[-1]) + 0.3
        for row, (field, logy) in enumerate((("step_ms", True), ("ratio", False))):
            ox, oy = j * W, 24 + row * H
            vals = [r[field] for r in rs if r[field] > 0] + ([r["floor_ms"] for r in rs] if row == 0 else [1.0])
            lo, hi = (math.log10(min(vals)), math.log10(max(vals))) if logy else (0.0, max(vals))
            hi = hi + 0.05 * (hi - lo or 1)

            def xy(x, y, ox=ox, oy=oy, lo=lo, hi=hi, logy=logy):
                fx = (math.log2(x) - lx0) / (lx1 - lx0)
                fy = ((math.log10(y) if logy else y) - lo) / (hi - lo)
                return ox + M + fx * (W - M - 12), oy + H - M + 10 - fy * (H - M - 10)

            d.rectangle([ox + M, oy + 10, ox + W - 12, oy + H - M + 10], outline="black")
            for x in xs:
                px, py = xy(x, 10 ** lo if logy else lo)
                d.text((px - 12, py + 4), f"{x // 1024}k" if x >= 1024 else str(x), fill="black")
            for f in (0.0, 0.5, 1.0):
                yv = lo + f * (hi - lo)
                _, py = xy(xs[0], 10 ** yv if logy else yv)
                d.text((ox + 4, py - 6), f"{10 ** yv:.3g}" if logy else f"{yv:.2f}", fill="black")
            d.text((ox + M, oy + H - 28), "committed context length P (log)", fill="black")
            d.text((ox + M + 4, oy + 12), f"{name}: {'ms per step (solid), floor (dashed), log' if row == 0 else 'time / floor'}",
                   fill="black")
            if row == 1:
                d.line([xy(xs[0], 1.0), xy(xs[-1], 1.0)], fill=(150, 150, 150))
            for k, (step, tree, cb) in enumerate(steps):
                cs = sorted((r for r in rs if (r["step"], r["tree"], variant(r)) == (step, tree, cb)),
                            key=lambda r: r["committed"])
                col = COLORS[k % len(COLORS)]
                pts = [xy(r["committed"], r[field]) for r in cs if r[field] > 0]
                d.line(pts, fill=col, width=2)
                for px, py in pts:
                    d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
                if row == 0:
                    fl = [xy(r["committed"], r["floor_ms"]) for r in cs]
                    for a, b in zip(fl, fl[1:]):  # dashed
                        for t0 in np.arange(0, 1, 0.2):
                            d.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                                    (a[0] + (b[0] - a[0]) * (t0 + 0.1), a[1] + (b[1] - a[1]) * (t0 + 0.1))], fill=col)
                d.text((ox + M + 8, oy + 28 + 13 * k), ("AR step" if step == "ar" else f"verify {tree}")
                       + (f", {variant_label(cb)}" if len({c for _, _, c in steps}) > 1 else ""), fill=col)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"plot: {path}")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=[str(ROOT / "configs" / "tiny.json")],
                    help="config.json files or model directories, each optionally @LAYERS (LM depth), e.g. "
                         "configs/qwen2_5_vl_7b.json@2")
    ap.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="committed context lengths P")
    ap.add_argument("--trees", nargs="*", default=["48-5-10", "chain3"],
                    help="verify trees (TOTAL-DEPTH-TOPK or chainN); none = AR only")
    ap.add_argument("--probe-capacity", action="store_true",
                    help="also time P = min(--lengths) inside each larger length's capacity")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="sizes the cache capacity, as decode.py's")
    ap.add_argument("--ar-steps", type=int, default=16, help="AR forwards per timed call (minus the 1-token run)")
    ap.add_argument("--verify-rounds", type=int, default=4, help="verify rounds per timed call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impl", default="xla", choices=["xla", "pallas"])
    ap.add_argument("--cache-blocks", type=int, nargs="+", default=None,
                    help="cache keys per chunk of the xla verify/decode attention, each its own cells in the same "
                         "run (0 = dense over the whole capacity, the reference); default: the library's")
    ap.add_argument("--gemm-columns", type=int, nargs="+", default=None,
                    help="query columns (KV heads x group x nodes) up to which a cache read runs as plain GEMMs, "
                         "each its own cells (crossed with --cache-blocks); default: the library's")
    ap.add_argument("--whole-cache-fill", type=float, nargs="+", default=None,
                    help="fill of the capacity from which a GEMM-form cache read takes the whole cache in one pass "
                         "(0 = always, above 1 = never), each its own cells; default: the library's")
    ap.add_argument("--cpu-kernel-rows", type=int, nargs="+", default=None,
                    help="query rows per KV head up to which a cache read runs the compiled CPU kernel "
                         "(cpu_kernels; 0 = never), each its own cells; default: the library's")
    ap.add_argument("--pin-workers", nargs="+", choices=("on", "off"), default=["on"],
                    help="XLA:CPU's worker threads pinned one per core (sparrow_jax.runtime, the default) or free; "
                         "both: each its own cells, interleaved")
    ap.add_argument("--label", default="", help="names the code measured in each record (field `code`), e.g. for "
                    "before/after runs of two checkouts")
    ap.add_argument("--stream-mib", type=int, default=512, help="array size of the bandwidth probe")
    ap.add_argument("--matmul-n", type=int, default=1024, help="square GEMM size of the matmul-rate probe")
    ap.add_argument("--jsonl", default=str(RESULTS / "roofline.jsonl"))
    ap.add_argument("--plot", default=str(RESULTS / "roofline.png"), help="PNG path ('' = none)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if min(args.lengths) < 1 or args.repeats < 1 or args.ar_steps < 1 or args.verify_rounds < 1:
        raise SystemExit("--lengths, --repeats, --ar-steps and --verify-rounds must be positive")
    for spec in args.configs:
        parse_config_spec(spec)  # fail before any work
    records = run(args)
    print_table(records)
    if args.plot:
        plot(records, args.plot)
    return records


if __name__ == "__main__":
    main()
