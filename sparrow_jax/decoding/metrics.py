"""Speculative decoding metrics, defined once (SPEC §2) and printed with every result."""

from __future__ import annotations

import numpy as np

DEFINITIONS = (
    "tau = tokens committed per verification round, bonus token included (EAGLE convention), counting only "
    "tokens emitted (none past EOS / max tokens); "
    "acceptance@d = P(a round accepts >= d draft tokens | it accepted >= d-1), rounds whose depth-d outcome was cut off by EOS / max tokens left out; "
    "DSR = AR decode time / speculative decode time (same engine, same outputs, after prefill); "
    "ESR = AR end-to-end time / speculative end-to-end time (prefill included); "
    "prefill share = prefill time / end-to-end time."
)


def acceptance_summary(accepted_BR, max_draft_tokens: int, cut_BR=None) -> dict:
    """Per-round statistics from `SpecResult.accepted_BR` (tokens emitted that round: accepted drafts +
    bonus, cut at EOS / max_new_tokens; 0 = row inactive) and `cut_BR` (round cut short; None = none).

    tau = mean tokens emitted per round. An uncut round that emitted e tokens accepted e - 1 drafts and
    rejected (or ran out of) the next depth; a cut round emitted only accepted drafts (all e of them),
    and the depth after them is unobserved, so it leaves that depth's acceptance rate out."""
    a = np.asarray(accepted_BR)
    cut = np.zeros(a.shape, bool) if cut_BR is None else np.asarray(cut_BR, bool)
    live = a > 0
    n, cut = a[live], cut[live]
    if n.size == 0:
        return {"rounds": 0, "tau": float("nan"), "acceptance_per_depth": [], "mean_accepted_drafts": float("nan")}
    drafts = np.where(cut, n, n - 1)
    cond = []
    for d in range(1, max_draft_tokens + 1):
        observed = (drafts >= d) | ((drafts == d - 1) & ~cut)
        seen = np.sum(observed)
        cond.append(float(np.sum(drafts >= d) / seen) if seen else float("nan"))
    return {
        "rounds": int(n.size),
        "tau": float(n.mean()),
        "mean_accepted_drafts": float(drafts.mean()),
        "acceptance_per_depth": [round(x, 4) for x in cond],
        "accepted_histogram": np.bincount(drafts, minlength=max_draft_tokens + 1).tolist(),
        "cut_rounds": int(cut.sum()),
    }


def speed_summary(*, ar_prefill_s, ar_decode_s, spec_prefill_s, spec_decode_s) -> dict:
    ar_total, spec_total = ar_prefill_s + ar_decode_s, spec_prefill_s + spec_decode_s
    return {
        "DSR": ar_decode_s / spec_decode_s if spec_decode_s > 0 else float("nan"),
        "ESR": ar_total / spec_total if spec_total > 0 else float("nan"),
        "prefill_share_spec": spec_prefill_s / spec_total if spec_total > 0 else float("nan"),
        "prefill_share_ar": ar_prefill_s / ar_total if ar_total > 0 else float("nan"),
    }
