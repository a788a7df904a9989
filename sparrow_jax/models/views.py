"""A draft's *visual view*: which prompt positions form its sequence and what each one carries.

One definition shared by training (the draft's slots) and decoding (the draft prefill); a draft stores
the view it was trained for in its config.json (`DraftConfig.visual_view`) and the engine refuses to
decode it in another one unless told to.

Sequence convention (the official EAGLE/Sparrow code's `input_ids[:, 1:]`): the draft's sequence
starts with token t1 paired with the target's hidden state h0, at draft position 0; the prompt's first
token never has an item of its own. An *item* is named by the position t >= 1 of its token and is
paired with h_{t-1} (the target's final-norm state at t - 1, whatever that position holds).

  view      items                               visual items carry                    draft positions
  none      text only (Sparrow VATA; EAGLE)     -                                      0, 1, ... (compacted)
  ivsb_mid  text + every visual position        target's state after layer m* (no FC)  IVSB training's: text
                                                                                       compacted, a visual item
                                                                                       at its preceding text
                                                                                       item's position
  msd       text + every visual position        target's input embedding of the        item index (full)
                                                visual token (projected feature; no FC)
  pruned    msd minus dropped visual positions  as msd                                 item index
            (keep a fraction: evenly spaced, or
            the most attended by the last prompt
            token at layer m*)

Text items always carry the HSR input z_t = FC([RMSNorm(e_t); h_{t-1}]).
"""

from __future__ import annotations

import numpy as np

VIEWS = ("none", "ivsb_mid", "msd", "pruned")
PRUNE_RULES = ("uniform", "attention")
DEFAULT_KEEP_FRACTION = 0.1  # SpecVLM's video setting: 90 % of the visual tokens dropped

# Decode modes (engine / decode.py names) and the view each one runs.
MODE_VIEW = {
    "text_only": "none",  # Sparrow (VATA + HSR) or plain EAGLE: the draft never sees a visual position
    "ivsb_mid": "ivsb_mid",  # the paper's "IVSB + MTP w/o VATA" ablation: bridged layer-m* visual states
    "full_visual": "msd",  # MSD-style: every visual position, carrying the target's visual embedding
    "pruned_visual": "pruned",  # pruned-visual EAGLE-style draft (SpecVLM's token drop; not SpecVLM itself)
}
MODES = tuple(MODE_VIEW)


class ViewMismatchError(ValueError):
    """A draft used in a visual view it was not trained for."""


def check_view(view: str, source: str = "visual_view") -> None:
    if view not in VIEWS:
        raise ValueError(f"{source}: unknown visual view {view!r}; expected one of {VIEWS}")


def check_prune(keep_fraction: float, prune_by: str, source: str = "pruning") -> None:
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"{source}: keep fraction must be in (0, 1], got {keep_fraction}")
    if prune_by not in PRUNE_RULES:
        raise ValueError(f"{source}: prune_by {prune_by!r}; expected one of {PRUNE_RULES}")


def view_for_mode(mode: str) -> str:
    if mode not in MODE_VIEW:
        raise ValueError(f"visual mode {mode!r}: expected one of {MODES}")
    return MODE_VIEW[mode]


def check_draft_view(trained_view: str, mode: str, *, allow_mismatch: bool = False, source: str = "draft") -> str:
    """The view `mode` runs; refuses a draft trained for another view unless `allow_mismatch`."""
    view = view_for_mode(mode)
    if view != trained_view and not allow_mismatch:
        fit = next(m for m, v in MODE_VIEW.items() if v == trained_view)
        fit = f"{fit!r}" + (" (decode.py --mode sparrow)" if fit == "text_only" else "")
        raise ViewMismatchError(
            f"{source} was trained for visual view {trained_view!r} (config.json visual_view) but mode {mode!r} "
            f"runs view {view!r}: its draft inputs would differ from training. Use mode {fit}, or pass "
            f"allow_view_mismatch=True (decode.py --force-view) to run it anyway")
    return view


def training_view(view: str, ivsb: bool) -> str:
    """The layout a draft of `view` trains on: view none with IVSB trains on the ivsb_mid layout (the
    visual slots exist in training only); ivsb_mid needs IVSB; msd / pruned ignore the switch."""
    check_view(view)
    if view == "none":
        return "ivsb_mid" if ivsb else "none"
    if view == "ivsb_mid" and not ivsb:
        raise ValueError("visual_view 'ivsb_mid' decodes with IVSB's bridged visual slots: it needs ivsb=true")
    return view


def visual_state(view: str) -> str | None:
    """What a visual item carries: 'mid' (layer-m* state), 'embed' (target input embedding) or None."""
    return {"none": None, "ivsb_mid": "mid", "msd": "embed", "pruned": "embed"}[view]


def num_kept(n_vis: int, keep_fraction: float) -> int:
    """Visual positions a pruned view keeps out of n_vis (at least one when there are any)."""
    return max(1, int(round(keep_fraction * n_vis))) if n_vis else 0


def kept_visual(n_vis: int, keep_fraction: float, score_M=None) -> np.ndarray:
    """Ordinals (among a row's visual positions, ascending) a pruned view keeps: evenly spaced, or,
    given `score_M`, the most attended ones (ties to the earlier position)."""
    k = num_kept(n_vis, keep_fraction)
    if not k:
        return np.zeros((0,), np.int64)
    if score_M is None:
        return np.unique(np.linspace(0, n_vis - 1, k).round().astype(np.int64))
    return np.sort(np.argsort(-np.asarray(score_M, np.float64)[:n_vis], kind="stable")[:k])


def sequence_layout(is_vis_T, view: str, kept_vis=None):
    """Host: the draft's items for one row of T positions in `view`.

    Returns (src [P] sequence positions t of the items, is_text [P], pos [P] draft positions, next_pos:
    the draft position of the next item, i.e. of the first token after these T). `kept_vis`: visual
    ordinals kept by the pruned view (see `kept_visual`)."""
    check_view(view)
    is_vis = np.asarray(is_vis_T, bool)
    keep = ~is_vis
    if view in ("ivsb_mid", "msd"):
        keep = np.ones_like(is_vis)
    elif view == "pruned":
        vis_pos = np.nonzero(is_vis)[0]
        keep = keep.copy()
        keep[vis_pos[np.asarray([] if kept_vis is None else kept_vis, np.int64)]] = True
    keep[:1] = False  # the official convention: the first item is (t1, h0)
    src = np.nonzero(keep)[0]
    is_text = ~is_vis[src]
    if view == "ivsb_mid":
        c = np.cumsum(is_text) - 1  # index of the last text item at or before each item
        pos = np.maximum(c, 0)
        nxt = int(c[-1]) + 1 if len(c) else 0
    else:
        pos = np.arange(len(src))
        nxt = len(src)
    return src, is_text, pos.astype(np.int32), nxt
