"""sparrow-jax: lossless speculative decoding for video LLMs in JAX/Flax (Sparrow, arXiv 2602.15318).

The public API lives in `sparrow_jax/api.py` and is re-exported here:

    from sparrow_jax import SpecDecoder
    decoder = SpecDecoder.from_pretrained("shipped/tiny-qwen2.5-vl", draft_dir="shipped/drafts/sparrow")
    [out] = decoder.generate(["Describe the video."], videos=["clip.mp4"], max_new_tokens=32)

Importing the package stays light (no JAX): the names load `sparrow_jax.api` on first use, so
`decode.py --help` and other light submodules do not pay for it."""

import importlib

__all__ = ["DecodeConfig", "GenerationOutput", "Processor", "SamplingParams", "SpecDecoder", "VisionOptions"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("sparrow_jax.api"), name)
    raise AttributeError(f"module 'sparrow_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
