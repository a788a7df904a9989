"""The stored tree choice of a draft: `<draft_dir>/tree_choice.json`, written by bench/tree_search.py and
read by `decode.py --tree auto`.

The file names, per visual-length bucket, the tree (EAGLE-2 TOTAL-DEPTH-TOPK notation, or chainN) that
decoded fastest with this draft on one backend:

  {"backend": "cpu", "device": "...", "target": "<sha256 of the target weights>",
   "buckets": [{"max_visual_tokens": 128, "tree": "24-5-6", "tokens_per_s": 812.0, "tau": 3.1}, ...],
   "command": "python bench/tree_search.py ...", "date": "..."}

A prompt with n visual tokens takes the smallest bucket with max_visual_tokens >= n, else the largest
one. A choice measured on another backend (cpu vs gpu vs tpu: the draft/verify cost ratio differs) is not
used; then, as without a file, the tree is DEFAULT_TREE (the paper's Qwen2.5-VL setting).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparrow_jax.decoding.tree import TreeSpec

FILE_NAME = "tree_choice.json"
DEFAULT_TREE = "48-5-10"  # the paper's Qwen2.5-VL setting (up to 6 draft tokens per path)


class TreeChoiceError(ValueError):
    """A malformed tree_choice.json (the message names the file)."""


def validate(d, source) -> dict:
    """The choice dict with its buckets sorted by max_visual_tokens; TreeChoiceError naming `source` for
    anything a reader could not use."""
    if not isinstance(d, dict):
        raise TreeChoiceError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if not isinstance(d.get("backend"), str) or not d["backend"]:
        raise TreeChoiceError(f"{source}: 'backend' must be a non-empty string (jax.default_backend()), "
                              f"got {d.get('backend')!r}")
    buckets = d.get("buckets")
    if not isinstance(buckets, list) or not buckets:
        raise TreeChoiceError(f"{source}: 'buckets' must be a non-empty list, got {buckets!r}")
    seen = set()
    for i, b in enumerate(buckets):
        where = f"{source}: buckets[{i}]"
        if not isinstance(b, dict):
            raise TreeChoiceError(f"{where}: expected an object, got {b!r}")
        n = b.get("max_visual_tokens")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TreeChoiceError(f"{where}: 'max_visual_tokens' must be an integer >= 0, got {n!r}")
        if n in seen:
            raise TreeChoiceError(f"{where}: max_visual_tokens {n} appears twice")
        seen.add(n)
        if not isinstance(b.get("tree"), str):
            raise TreeChoiceError(f"{where}: 'tree' must be a string like '48-5-10' or 'chain4', got {b.get('tree')!r}")
        try:
            TreeSpec.parse(b["tree"])
        except ValueError as e:
            raise TreeChoiceError(f"{where}: {e}") from None
    return {**d, "buckets": sorted(buckets, key=lambda b: b["max_visual_tokens"])}


def read(path) -> dict:
    """Load and validate a tree_choice.json."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TreeChoiceError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TreeChoiceError(f"{p}: cannot read ({e})") from None
    return validate(d, p)


def write(path, choice: dict) -> None:
    """Validate and write a tree choice (indented JSON)."""
    p = Path(path)
    choice = validate(choice, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(choice, indent=1) + "\n")


def visual_tokens(prompt) -> int:
    """A prompt's visual token count (its image/video pad positions): what the buckets are keyed by."""
    return int(np.count_nonzero(prompt.mm_token_type_ids))


def pick_bucket(buckets: list[dict], visual_tokens: int) -> dict:
    """The smallest bucket holding `visual_tokens` (max_visual_tokens >= it), else the largest one."""
    ordered = sorted(buckets, key=lambda b: b["max_visual_tokens"])
    return next((b for b in ordered if b["max_visual_tokens"] >= visual_tokens), ordered[-1])


def auto_tree(draft_dir, visual_tokens: int, backend: str) -> tuple[TreeSpec, str]:
    """(tree, one-line note) for `--tree auto`: the stored choice of `draft_dir` for a prompt of
    `visual_tokens`, or DEFAULT_TREE when there is no draft directory, no file, or the file was measured
    on another backend. A malformed file raises TreeChoiceError."""
    default = TreeSpec.parse(DEFAULT_TREE)
    if draft_dir is None:
        return default, f"--tree auto: no draft directory (random draft), using the default {default}"
    path = Path(draft_dir) / FILE_NAME
    if not path.is_file():
        return default, (f"--tree auto: no {path}, using the default {default} (measure one with: python "
                         f"bench/tree_search.py --draft {draft_dir})")
    choice = read(path)
    if choice["backend"] != backend:
        return default, (f"--tree auto: {path} was measured on backend {choice['backend']}, this is {backend}: "
                         f"using the default {default}")
    b = pick_bucket(choice["buckets"], visual_tokens)
    speed = f", {b['tokens_per_s']:.0f} tokens/s" if isinstance(b.get("tokens_per_s"), (int, float)) else ""
    return TreeSpec.parse(b["tree"]), (f"--tree auto: {b['tree']} from {path} (bucket <= {b['max_visual_tokens']} "
                                       f"visual tokens for {visual_tokens}; measured on {backend}{speed})")
