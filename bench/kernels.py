"""Pallas kernels vs the XLA attention path, on the present backend.

For each op, both sides are jitted and called on the same inputs; each reports the median of
--repeats calls after --warmup calls (and the first call, which includes compilation):
  vata         draft tree step: T = top_k queries over a text-only cache + an in-tree block
  tree_verify  target verify: N tree tokens over a long committed cache + the tree block (split-K)
  prefill      causal prefill of one sequence (forward)
  prefill_grad forward + backward of the prefill (custom VJP vs autodiff of the XLA path)
The XLA side is `sparrow_jax.models.attention.attention(...)` with impl XLA (dense, or blockwise for
large prefill — what the engine runs). The Pallas side calls the kernels directly with the dispatch's
accelerator block sizes (`DispatchConfig()` defaults: block_q 128, block_rows 64, block_kv 128,
verify chunk 2048).

On CPU the kernels run in the Pallas *interpreter* (`interpret=True`): those timings measure the
interpreter, not a kernel, and are NOT meaningful as performance numbers; every CPU record is
labelled `"mode": "interpret (timings not meaningful)"`. On GPU (Triton) / TPU (Mosaic) the same
script times compiled kernels (untested so far: no accelerator was available when this was written).

  python bench/kernels.py                       # default shapes (CPU-sized)
  python bench/kernels.py --scale large         # 7B-like shapes: 32k verify cache, 8k prefill
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_jsonl  # noqa: E402

from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.prefill import prefill_attention  # noqa: E402
from pallas_kernels.tree_verify import tree_verify_attention  # noqa: E402
from pallas_kernels.vata import vata_attention  # noqa: E402
from sparrow_jax.models.attention import MaskSpec, attention, dense_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.jsonl"

# (B, H, K, E) head layout and per-op lengths. "small" fits the CPU interpreter in a few minutes;
# "large" is Qwen2.5-VL-7B's text attention (28 q heads, 4 kv heads, head_dim 128).
SCALES = {
    "small": dict(B=1, H=8, K=2, E=64, vata=dict(T=10, S=2048, N=40), verify=dict(T=48, S=16384),
                  prefill=dict(T=2048), grad=dict(T=1024)),
    "large": dict(B=1, H=28, K=4, E=128, vata=dict(T=10, S=4096, N=40), verify=dict(T=48, S=32768),
                  prefill=dict(T=8192), grad=dict(T=4096)),
}


def _time(f, args, warmup, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, first


def _tree_mask(rng, B, T, N):
    """Ancestor-like mask: each node sees itself and a random subset of earlier nodes."""
    m = np.tril(rng.random((B, T, N)) < 0.3, k=N - T)
    m[:, np.arange(T), N - T + np.arange(T)] = True
    return jnp.asarray(m)


def cases(scale: str, dtype, seed=0):
    p = SCALES[scale]
    B, H, K, E = p["B"], p["H"], p["K"], p["E"]
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32)).astype(dtype)  # noqa: E731
    out = []
    for name in ("vata", "verify"):
        T, S = p[name]["T"], p[name]["S"]
        N = p[name].get("N", T)
        lens = jnp.full((B,), S - S // 8, jnp.int32)  # a cache not quite full (capacity > length)
        mask = _tree_mask(rng, B, T, N)
        args = (r(B, T, H, E), r(B, S, K, E), r(B, S, K, E), lens, r(B, N, K, E), r(B, N, K, E), mask)
        out.append((name if name == "vata" else "tree_verify", dict(T=T, S=S, N=N, kv_len=int(lens[0])), args))
    T = p["prefill"]["T"]
    out.append(("prefill", dict(T=T, S=T, causal=True), (r(B, T, H, E), r(B, T, K, E), r(B, T, K, E),
                                                          jnp.full((B,), T, jnp.int32))))
    T = p["grad"]["T"]
    out.append(("prefill_grad", dict(T=T, S=T, causal=True), (r(B, T, H, E), r(B, T, K, E), r(B, T, K, E),
                                                               jnp.full((B,), T, jnp.int32))))
    return out


def fns(name, cfg: dispatch.DispatchConfig):
    be = cfg.resolved_backend()
    if name in ("vata", "tree_verify"):
        def xla(q, k, v, lens, bk, bv, m):
            return attention(q, k, v, MaskSpec(kv_len_B=lens, block_mask_BTN=m), block_k=bk, block_v=bv)
        if name == "vata":
            def pal(*a):
                return vata_attention(*a, block_rows=cfg.block_rows, block_kv=cfg.block_kv, backend=be)
        else:
            def pal(*a):
                return tree_verify_attention(*a, block_rows=cfg.block_rows, block_kv=cfg.block_kv,
                                             chunk=cfg.verify_chunk, backend=be)
        return jax.jit(pal), jax.jit(xla)

    def xla_fwd(q, k, v, lens):
        return attention(q, k, v, MaskSpec(kv_len_B=lens, causal=True))

    def pal_fwd(q, k, v, lens):
        return prefill_attention(q, k, v, lens, causal=True, block_q=cfg.block_q, block_kv=cfg.block_kv, backend=be)

    if name == "prefill":
        return jax.jit(pal_fwd), jax.jit(xla_fwd)

    def grad_of(f, dense: bool):
        def g(q, k, v, lens):
            mask = MaskSpec(kv_len_B=lens, causal=True)
            if dense:
                def fwd(q, k, v):
                    return dense_attention(q, k, v, mask)
            else:
                def fwd(q, k, v):
                    return f(q, k, v, lens)
            return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(q, k, v)
        return jax.jit(g)

    # The XLA blockwise loop is inference-only (dynamic trip count); training's XLA path is dense.
    return grad_of(pal_fwd, False), grad_of(None, True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: float32 on CPU, bfloat16 on GPU/TPU")
    ap.add_argument("--ops", nargs="+", default=["vata", "tree_verify", "prefill", "prefill_grad"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    # The accelerator block sizes (the interpreter's small test blocks would only slow it down further).
    cfg = dispatch.DispatchConfig()
    be = cfg.resolved_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    mode = "interpret (timings not meaningful)" if be.interpret else f"compiled ({be.style})"
    env = environment()
    print(f"[kernels] backend {env['backend']} — Pallas {mode}; dtype {dtype.name}; scale {args.scale}")
    p = SCALES[args.scale]
    for name, shape, inputs in cases(args.scale, dtype):
        if name not in args.ops:
            continue
        pal, xla = fns(name, cfg)
        pal_ms, pal_first = _time(pal, inputs, args.warmup, args.repeats)
        xla_ms, xla_first = _time(xla, inputs, args.warmup, args.repeats)
        o_p, o_x = pal(*inputs), xla(*inputs)
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                  for a, b in zip(jax.tree.leaves(o_p), jax.tree.leaves(o_x)))
        rec = dict(bench="kernels", **env, mode=mode, dtype=dtype.name, scale=args.scale, op=name,
                   B=p["B"], H=p["H"], K=p["K"], E=p["E"], **shape,
                   block=dict(block_q=cfg.block_q, block_rows=cfg.block_rows, block_kv=cfg.block_kv,
                              verify_chunk=cfg.verify_chunk),
                   pallas_ms=round(pal_ms, 3), xla_ms=round(xla_ms, 3), pallas_over_xla=round(pal_ms / xla_ms, 3),
                   pallas_first_s=round(pal_first, 3), xla_first_s=round(xla_first, 3), max_abs_diff=err,
                   warmup=args.warmup, repeats=args.repeats)
        write_jsonl(args.out, rec)
        print(f"  {name:13s} {str(shape):55s} pallas {pal_ms:10.2f} ms   xla {xla_ms:9.2f} ms   "
              f"ratio {pal_ms / xla_ms:7.2f}   max|diff| {err:.1e}")
    if be.interpret:
        print("[kernels] CPU: the Pallas side ran in the interpreter — these timings are not kernel performance.")


if __name__ == "__main__":
    main()
