"""Speculative decoding metrics, defined once (SPEC §2) and printed with every result."""

from __future__ import annotations

import numpy as np

DEFINITIONS = (
    "tau = tokens committed per verification round, bonus token included (EAGLE convention); "
    "acceptance@d = P(a round accepts >= d draft tokens | it accepted >= d-1); "
    "DSR = AR decode time / speculative decode time (same engine, same outputs, after prefill); "
    "ESR = AR end-to-end time / speculative end-to-end time (prefill included); "
    "prefill share = prefill time / end-to-end time."
)


def acceptance_summary(accepted_BR, depth: int) -> dict:
    """accepted_BR: per row and round, accepted path length incl. root (= tokens committed that
    round, bonus included); 0 marks rounds a row did not run."""
    a = np.asarray(accepted_BR)
    n = a[a > 0]
    if n.size == 0:
        return {"rounds": 0, "tau": float("nan"), "acceptance_per_depth": [], "mean_accepted_drafts": float("nan")}
    drafts = n - 1
    cond = []
    for d in range(1, depth + 1):
        reached = np.sum(drafts >= d - 1)
        cond.append(float(np.sum(drafts >= d) / reached) if reached else float("nan"))
    return {
        "rounds": int(n.size),
        "tau": float(n.mean()),
        "mean_accepted_drafts": float(drafts.mean()),
        "acceptance_per_depth": [round(x, 4) for x in cond],
        "accepted_histogram": np.bincount(drafts, minlength=depth + 1).tolist(),
    }


def speed_summary(*, ar_prefill_s, ar_decode_s, spec_prefill_s, spec_decode_s) -> dict:
    ar_total, spec_total = ar_prefill_s + ar_decode_s, spec_prefill_s + spec_decode_s
    return {
        "DSR": ar_decode_s / spec_decode_s if spec_decode_s > 0 else float("nan"),
        "ESR": ar_total / spec_total if spec_total > 0 else float("nan"),
        "prefill_share_spec": spec_prefill_s / spec_total if spec_total > 0 else float("nan"),
        "prefill_share_ar": ar_prefill_s / ar_total if ar_total > 0 else float("nan"),
    }
