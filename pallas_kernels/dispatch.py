"""Kernel-or-XLA dispatch behind `sparrow_jax.models.attention.attention(..., impl=AttentionImpl("pallas"))`
(reached from `decode.py --attention pallas` through EngineConfig.impl / prefill / verify).

Routing (static: decided at trace time from shapes, dtypes, backend and the `DispatchConfig` the
caller passes — `AttentionImpl.blocks`, or `default_config()` for the backend):
- no extra block (`block_k is None`): prefill / training / vision segments -> `prefill_attention`
  (causal or not, per-row key lengths; needs T == S when causal);
- committed cache + extra block under a mask (decode, verify, draft catch-up, draft tree steps):
  cache capacity S >= `split_min_len` -> `tree_verify_attention` (split-K over chunks), else
  `vata_attention` (single pass). The draft's text-only cache is short (VATA); the target's
  video cache is long (tree verify). Both compute the same function.
- anything a kernel cannot take goes to the XLA path, with the reason logged once (`route` returns it).
Each route runs as a jitted function named `sparrow_attn_<route>`, so every call site stays a
`call @sparrow_attn_<route>` in the lowered program, forward and backward: `routes_in(lowered)` reads
which routes a program takes (tests check the kernels, not the fallback, ran — under `grad` too).
Training differentiates either way: the prefill kernel through its custom VJP, the XLA fallback through
dense autodiff or the blockwise path's custom VJP (`TrainConfig.attention = "pallas"`).

Backend: TPU -> Mosaic TPU compiler settings; GPU -> Triton; CPU -> the same kernel bodies under
the Pallas interpreter (`interpret=True`, chosen automatically). GPU/TPU lowering is untested here
(developed on CPU only).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re

import jax
import jax.numpy as jnp

from pallas_kernels import common as C
from pallas_kernels.prefill import prefill_attention
from pallas_kernels.tree_verify import tree_verify_attention
from pallas_kernels.vata import vata_attention

log = logging.getLogger("pallas_kernels")

KERNELS = ("prefill", "vata", "tree_verify")
ROUTES = KERNELS + ("xla",)
PREFIX = "sparrow_attn_"  # the jitted route functions' names, kept by the lowering


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    block_q: int = 128  # prefill: query rows (tokens x group heads) per program
    block_rows: int = 64  # cache+block kernels: query rows per program
    block_kv: int = 128  # keys per inner online-softmax step
    verify_chunk: int = 2048  # tree verify: keys per split-K program
    split_min_len: int = 8192  # cache capacity from which the split-K kernel is used
    # TPU: whole-row K/V blocks (prefill, VATA) must fit VMEM double-buffered; 12 MiB stays under
    # the default 16 MiB scoped limit. Raise together with Backend(vmem_limit_bytes=...).
    vmem_budget_bytes: int = 12 << 20
    backend: C.Backend | None = None  # None: detect from jax.default_backend()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            least = 0 if f.name == "vmem_budget_bytes" else 1  # budget 0: every TPU whole-row kernel to XLA
            if f.name != "backend" and (not isinstance(v, int) or v < least):
                raise ValueError(f"DispatchConfig.{f.name} {v!r}: expected an int >= {least}")
        if self.backend is not None and not isinstance(self.backend, C.Backend):
            raise TypeError(f"DispatchConfig.backend {self.backend!r}: expected a pallas_kernels.Backend")

    def resolved_backend(self) -> C.Backend:
        return self.backend or C.Backend.detect()


# Interpret mode: small blocks keep the CPU interpreter fast and exercise multi-block paths.
INTERPRET_DEFAULTS = dict(block_q=32, block_rows=32, block_kv=32, verify_chunk=64, split_min_len=128)


def default_config(**fields) -> DispatchConfig:
    """The block sizes for `fields["backend"]` (absent: the detected one): accelerator defaults, or small
    interpreter blocks on CPU; `fields` replace some of them (e.g. `split_min_len=160`)."""
    backend = fields.get("backend") or C.Backend.detect()
    base = DispatchConfig(**INTERPRET_DEFAULTS) if backend.interpret else DispatchConfig()
    return dataclasses.replace(base, **fields)


def _tpu_vmem_bytes(S: int, E: int, itemsize: int) -> int:
    return 2 * 2 * S * E * itemsize  # K and V (or Q and dO in the dK/dV kernel), double-buffered


def route(q_BTHE, k_BSKE, v_BSKE, mask, *, block_k=None, block_v=None, config: DispatchConfig | None = None):
    """(kernel name or "xla", reason). Works on arrays or ShapeDtypeStructs. `config` None: `default_config()`."""
    cfg = config or default_config()
    backend = cfg.resolved_backend()
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    dtypes = {jnp.dtype(x.dtype) for x in (q_BTHE, k_BSKE, v_BSKE)}
    if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        return "xla", f"non-float inputs {sorted(map(str, dtypes))}"
    if H % K:
        return "xla", f"query heads {H} not a multiple of kv heads {K}"
    if min(B, T, S) == 0:
        return "xla", "empty operand"
    itemsize = jnp.dtype(k_BSKE.dtype).itemsize
    if block_k is None:
        if mask.block_mask_BTN is not None:
            return "xla", "block mask without block keys"
        if mask.causal and T != S:
            return "xla", f"causal attention with T {T} != S {S} (prefill kernel needs one sequence)"
        Ep = C.padded_head_dim(E, backend.style)  # the prefill kernel zero-pads head_dim (q/k/v copy)
        if backend.style == "tpu" and _tpu_vmem_bytes(max(S, T * H // K), Ep, itemsize) > cfg.vmem_budget_bytes:
            return "xla", (f"TPU: whole-row blocks ({S} keys, {T * H // K} query rows) exceed the VMEM budget "
                           f"{cfg.vmem_budget_bytes >> 20} MiB")
        return "prefill", ""
    if block_v is None or mask.block_mask_BTN is None:
        return "xla", "block keys without block values or block mask"
    if (r := C.head_dim_reason(backend.style, E)) is not None:  # padding would copy the whole cache per call
        return "xla", r
    if S >= cfg.split_min_len:
        return "tree_verify", ""
    if backend.style == "tpu" and _tpu_vmem_bytes(S, E, itemsize) > cfg.vmem_budget_bytes:
        return "tree_verify", ""  # VATA holds the whole cache row in VMEM; split-K does not
    return "vata", ""


_logged: set[str] = set()


def log_fallback(reason: str):
    """Warn once per distinct reason that a call took the XLA path."""
    if reason not in _logged:
        _logged.add(reason)
        log.warning("pallas attention -> XLA path: %s", reason)


def routed(name: str, **jit_kwargs):
    """Decorator: jit `fn` under the name `sparrow_attn_<name>` (what `routes_in` finds)."""
    if name not in ROUTES:
        raise ValueError(f"route {name!r}: expected one of {ROUTES}")

    def wrap(fn):
        fn.__name__ = fn.__qualname__ = PREFIX + name
        return jax.jit(fn, **jit_kwargs)

    return wrap


@routed("prefill", static_argnames=("causal", "cfg"))
def _prefill(q_BTHE, k_BSKE, v_BSKE, kv_len_B, *, causal: bool, cfg: DispatchConfig):
    return prefill_attention(q_BTHE, k_BSKE, v_BSKE, kv_len_B, causal=causal, block_q=cfg.block_q,
                             block_kv=cfg.block_kv, backend=cfg.resolved_backend())


@routed("vata", static_argnames=("cfg",))
def _vata(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k, block_v, block_mask_BTN, *, cfg: DispatchConfig):
    return vata_attention(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k, block_v, block_mask_BTN,
                          block_rows=cfg.block_rows, block_kv=cfg.block_kv, backend=cfg.resolved_backend())


@routed("tree_verify", static_argnames=("cfg",))
def _tree_verify(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k, block_v, block_mask_BTN, *, cfg: DispatchConfig):
    return tree_verify_attention(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k, block_v, block_mask_BTN,
                                 block_rows=cfg.block_rows, block_kv=cfg.block_kv, chunk=cfg.verify_chunk,
                                 backend=cfg.resolved_backend())


def run_kernel(name: str, q_BTHE, k_BSKE, v_BSKE, mask, *, block_k=None, block_v=None, config: DispatchConfig):
    """Run kernel route `name` (from `route`; not "xla") with `config`'s block sizes."""
    if name == "prefill":
        return _prefill(q_BTHE, k_BSKE, v_BSKE, mask.kv_len_B, causal=mask.causal, cfg=config)
    fn = {"vata": _vata, "tree_verify": _tree_verify}[name]
    return fn(q_BTHE, k_BSKE, v_BSKE, mask.kv_len_B, block_k, block_v, mask.block_mask_BTN, cfg=config)


_FUNC = re.compile(r"func\.func\s+(?:\w+\s+)*@([\w.$-]+)")
_CALL = re.compile(r"call @" + PREFIX + r"([a-z_]+?)(?:_\d+)?\(")


def routes_in(program) -> collections.Counter:
    """Which attention routes a lowered program calls: `jax.jit(f).lower(...)` or its `.as_text()`
    -> Counter {route: call sites}, routes from `ROUTES` (kernels, or "xla" for the fallback). Call
    sites are counted in the program text (a layer loop in Python gives one per layer; a differentiated
    program has its forward and backward calls), not inside the routes' own bodies. impl "xla" never
    goes through the dispatch: its programs have no routes."""
    text = program if isinstance(program, str) else program.as_text()
    counts: collections.Counter = collections.Counter()
    in_route = False
    for line in text.splitlines():
        if (m := _FUNC.search(line)) is not None:
            in_route = m.group(1).startswith(PREFIX)
        elif not in_route:
            counts.update(c.group(1) for c in _CALL.finditer(line))
    return counts
