"""Streaming hooks for the compiled loops, kept out of their compile key.

A loop takes `emit_id`: None compiles no streaming (the only static part), a traced int32 scalar
names the host hook to call. The traced code always calls the one module-level `_dispatch` (a stable
identity), which looks the hook up at run time: a new printer reuses the compiled program."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp

_HOOKS: dict[int, Callable] = {}
_IDS = itertools.count()


def _dispatch(emit_id, tokens_BL, counts_B):
    _HOOKS[int(emit_id)](tokens_BL, counts_B)


def emit(emit_id, tokens_BL, counts_B):
    """Traced: hand tokens [B, L] (the first counts_B[b] of row b are new) to the hook under emit_id;
    nothing when emit_id is None. A device->host transfer each time: leave streaming off when timing."""
    if emit_id is not None:
        jax.debug.callback(_dispatch, emit_id, tokens_BL, counts_B, ordered=True)


@contextlib.contextmanager
def hooked(on_emit: Callable | None):
    """Host: register on_emit(tokens [B, L], counts [B]) for one call and yield its id (None without a
    hook). On exit wait for the call's callbacks (jax.effects_barrier) before forgetting the hook."""
    if on_emit is None:
        yield None
        return
    i = next(_IDS)
    _HOOKS[i] = on_emit
    try:
        yield jnp.int32(i)
    finally:
        jax.effects_barrier()
        del _HOOKS[i]
