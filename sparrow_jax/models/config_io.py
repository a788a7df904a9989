"""Reading config.json files, with errors that name the file (one place for every model family), and
`ConfigError`, the error of every target family's config (a leaf module: families, the registry and
the checkpoint code all import it without importing each other)."""

from __future__ import annotations

import json
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that cannot describe a model we support."""


def read_config_json(path, error_cls: type[Exception], expected: str = "a HF checkpoint directory"):
    """`path` is a checkpoint directory (its config.json is read) or a config file -> (dict, source)."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() or not p.suffix else p
    if not p.is_file():
        raise error_cls(f"{p}: not found (expected {expected})")
    try:
        return json.loads(p.read_text()), str(p)
    except json.JSONDecodeError as e:
        raise error_cls(f"{p}: invalid JSON ({e})") from None
