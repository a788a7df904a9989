"""Kernel-or-XLA dispatch behind `sparrow_jax.models.attention.attention(..., impl="pallas")`
(reached from `decode.py --attention pallas` through EngineConfig.impl / prefill / verify).

Routing (static: decided at trace time from shapes, dtypes, backend and the active config):
- no extra block (`block_k is None`): prefill / training / vision segments -> `prefill_attention`
  (causal or not, per-row key lengths; needs T == S when causal);
- committed cache + extra block under a mask (decode, verify, draft catch-up, draft tree steps):
  cache capacity S >= `split_min_len` -> `tree_verify_attention` (split-K over chunks), else
  `vata_attention` (single pass). The draft's text-only cache is short (VATA); the target's
  video cache is long (tree verify). Both compute the same function.
- anything a kernel cannot take goes to the XLA path, with the reason logged once
  (`route` returns it; tests use that).
Training differentiates either way: the prefill kernel through its custom VJP, the XLA fallback through
dense autodiff or the blockwise path's custom VJP (`TrainConfig.attention = "pallas"`).

Backend: TPU -> Mosaic TPU compiler settings; GPU -> Triton; CPU -> the same kernel bodies under
the Pallas interpreter (`interpret=True`, chosen automatically). GPU/TPU lowering is untested here
(developed on CPU only).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging

import jax.numpy as jnp

from pallas_kernels import common as C
from pallas_kernels.prefill import prefill_attention
from pallas_kernels.tree_verify import tree_verify_attention
from pallas_kernels.vata import vata_attention

log = logging.getLogger("pallas_kernels")

KERNELS = ("prefill", "vata", "tree_verify")


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

    def resolved_backend(self) -> C.Backend:
        return self.backend or C.Backend.detect()


# Interpret mode: small blocks keep the CPU interpreter fast and exercise multi-block paths.
INTERPRET_DEFAULTS = dict(block_q=32, block_rows=32, block_kv=32, verify_chunk=64, split_min_len=128)

_override: DispatchConfig | None = None


def current_config() -> DispatchConfig:
    if _override is not None:
        return _override
    backend = C.Backend.detect()
    return DispatchConfig(**INTERPRET_DEFAULTS) if backend.interpret else DispatchConfig()


@contextlib.contextmanager
def override(**kwargs):
    """Temporarily replace fields of the active config (read at trace time: functions already jitted
    keep their routing until retraced, e.g. after `jax.clear_caches()`)."""
    global _override
    prev = _override
    _override = dataclasses.replace(current_config(), **kwargs)
    try:
        yield _override
    finally:
        _override = prev


def _tpu_vmem_bytes(S: int, E: int, itemsize: int) -> int:
    return 2 * 2 * S * E * itemsize  # K and V (or Q and dO in the dK/dV kernel), double-buffered


def route(q_BTHE, k_BSKE, v_BSKE, mask, *, block_k=None, block_v=None, config: DispatchConfig | None = None):
    """(kernel name or "xla", reason). Works on arrays or ShapeDtypeStructs."""
    cfg = config or current_config()
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
# Trace-time count of the routes taken (kernel names and "xla"); lets tests and benchmarks check
# that the kernels, not the fallback, ran.
route_counts: collections.Counter = collections.Counter()


def attention(q_BTHE, k_BSKE, v_BSKE, mask, *, block_k=None, block_v=None):
    """Same contract as `sparrow_jax.models.attention.attention`."""
    cfg = current_config()
    name, reason = route(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v, config=cfg)
    backend = cfg.resolved_backend()
    route_counts[name] += 1
    if name == "xla":
        if reason not in _logged:
            _logged.add(reason)
            log.warning("pallas attention -> XLA path: %s", reason)
        from sparrow_jax.models import attention as attn_lib  # noqa: PLC0415

        return attn_lib.attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v, impl="xla")
    if name == "prefill":
        return prefill_attention(q_BTHE, k_BSKE, v_BSKE, mask.kv_len_B, causal=mask.causal, block_q=cfg.block_q,
                                 block_kv=cfg.block_kv, backend=backend)
    args = (q_BTHE, k_BSKE, v_BSKE, mask.kv_len_B, block_k, block_v, mask.block_mask_BTN)
    if name == "vata":
        return vata_attention(*args, block_rows=cfg.block_rows, block_kv=cfg.block_kv, backend=backend)
    return tree_verify_attention(*args, block_rows=cfg.block_rows, block_kv=cfg.block_kv, chunk=cfg.verify_chunk,
                                 backend=backend)
