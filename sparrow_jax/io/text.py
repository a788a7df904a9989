"""Text <-> token ids for the CLIs: the checkpoint's own `tokenizer.json` when it has one, otherwise a
byte-level codec (ids = byte + 1, 0 reserved) so a tokenizer-less random target can still run."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

QWEN_USER_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN_ASSISTANT_PREFIX = "<|im_end|>\n<|im_start|>assistant\n"


class ByteCodec:
    name = "bytes (no tokenizer.json: ids are UTF-8 bytes + 1)"

    def __init__(self, vocab_size: int):
        if vocab_size < 257:
            raise ValueError(f"byte codec needs vocab >= 257, target has {vocab_size}")

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 1 for i in ids if 1 <= i <= 256).decode("utf-8", errors="replace")


class HFTokenizerCodec:
    def __init__(self, path: Path):
        self.tok = Tokenizer.from_file(str(path))
        self.name = f"tokenizers ({path})"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_codec(target_dir, vocab_size: int):
    if target_dir is not None and (Path(target_dir) / "tokenizer.json").is_file():
        return HFTokenizerCodec(Path(target_dir) / "tokenizer.json")
    return ByteCodec(vocab_size)
