"""Runtime tokenizer: a thin, explicit wrapper over a Hugging Face ``tokenizer.json``.

Only ``tokenizers`` and the standard library are used here (no transformers).

Conventions, chosen so that chat rendering and label masking are exact:

* ``encode`` never adds BOS/EOS (``add_special_tokens=False``). Chat templates write every
  control token into the rendered string themselves, and added tokens (special or not, e.g.
  ``<|im_end|>``, ``<tool_call>``) written in the text are recognised as single tokens, exactly
  as ``transformers`` does by default.
* ``encode_with_offsets`` (and ``encode_batch_with_offsets``, for many texts at once) returns
  ``(start, end)`` *character* offsets into the string that was passed in (before NFC
  normalisation), one pair per token, in text order (starts and ends never decrease). For
  ordinary text the spans tile the string: ``"".join(text[s:e] for s, e in offsets) == text``.
  The one exception is byte-level BPE splitting a single multi-byte character (an emoji, a rare
  CJK character) over several tokens: each of those tokens then reports the span of the whole
  character, so the spans overlap (``(3, 4), (3, 4)``). Text that NFC changes
  (``"e\\u0301"`` -> ``"é"``) maps back to the original, un-normalised span. An added token's
  span is exactly its literal text.
* ``piece`` gives a printable, unambiguous rendering of one token for token audits (see its
  docstring).

A model family's control tokens (``<|im_end|>``, ``<seed:eos>``) belong to its chat template:
``engine.chat.special_ids(tokenizer, template)`` resolves them and refuses another family's
tokenizer.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from operator import le
from pathlib import Path
from typing import Iterable

import tokenizers
import tokenizers.models
import tokenizers.normalizers
from tokenizers import decoders as _decoders

from engine.errors import MissingTokenError, TokenizerError

__all__ = [
    "Tokenizer",
    "TokenizerError",
    "MissingTokenError",
    "bytes_to_unicode",
]

TOKENIZER_FILENAME = "tokenizer.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode-character table used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}
_SIMPLE_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def _escape_char(ch: str) -> str:
    if ch in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[ch]
    if ch.isprintable():  # note: " " is printable; other spaces such as U+00A0 are not
        return ch
    cp = ord(ch)
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _render_bytes(data: bytes) -> str:
    """Decode UTF-8 where valid, show every other byte as ``<0xAB>``, escape non-printables."""
    out: list[str] = []
    i = 0
    while i < len(data):
        lead = data[i]
        width = 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        ch = None
        if width:
            try:
                ch = data[i : i + width].decode("utf-8")
            except UnicodeDecodeError:
                ch = None
        if ch is None:
            out.append(f"<0x{lead:02X}>")
            i += 1
        else:
            out.append(_escape_char(ch))
            i += width
    return "".join(out)


def _cover_normalisation_gaps(offsets: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Give characters that NFC composed away back to the token holding their composite.

    ``tokenizers`` aligns a composed character (``"e\u0301"`` -> ``"é"``) with its first
    original character only, leaving the absorbed combining marks in no token's span. Byte-level
    BPE drops no other characters, so any uncovered run ``[a, b)`` belongs to the token(s) ending
    at ``a`` (several when that character's bytes were split over tokens): extend them to ``b``.
    Offsets without such a gap (any text NFC leaves alone) are returned as they are.
    """
    if not offsets:
        return offsets
    starts, ends = zip(*offsets)
    if starts[0] == 0 and ends[-1] >= n and all(map(le, ends, ends[1:])) and all(map(le, starts[1:], ends)):
        return offsets  # in order, and every token starts where the text before it is covered: no gap
    spans = [list(o) for o in offsets]
    covered = 0  # end of the text covered by the tokens seen so far
    for k, (s, e) in enumerate(spans):
        if s > covered:
            if k == 0:  # cannot happen for NFC (nothing composes into a first character); be safe
                spans[0][0] = 0
            else:
                for sp in spans[:k]:
                    if sp[1] == covered:
                        sp[1] = s
        covered = max(covered, spans[k][1])
    if spans and covered < n:
        for sp in spans:
            if sp[1] == covered:
                sp[1] = n
    return [(s, e) for s, e in spans]


NFC_MAX_SHRINK = 4  # NFC keeps at least 2/7 of a text's UTF-8 bytes (Unicode 14); 4 leaves a margin


def _maps_text_to_bytes(pre_tokenizer) -> bool:
    """Whether a pre-tokenizer hands the model the text's bytes (a ByteLevel step, maybe in a
    Sequence): checked on a probe, whose pieces must spell its UTF-8 bytes in the byte-level alphabet."""
    if pre_tokenizer is None:
        return False
    probe = "a é€😀"
    spelled = "".join(_BYTE_ENCODER[b] for b in probe.encode("utf-8"))
    got = "".join(piece for piece, _ in pre_tokenizer.pre_tokenize_str(probe))
    return got in (spelled, _BYTE_ENCODER[ord(" ")] + spelled)  # add_prefix_space may add one


def _not_a_tokenizer(file: Path, error: Exception) -> TokenizerError:
    """Why ``file`` failed to load as a tokenizer (with ``error``), in the user's terms."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return TokenizerError(
            f"{str(file)!r} is not a tokenizer.json: it is not valid JSON ({e}). Pass the "
            f"Hugging Face fast-tokenizer file tokenizer.json (not a .model/.tiktoken/vocab file)."
        )
    if not isinstance(data, dict) or "model" not in data:
        keys = ", ".join(sorted(data)[:8]) if isinstance(data, dict) else type(data).__name__
        return TokenizerError(
            f"{str(file)!r} is not a tokenizer.json: it is JSON but has no 'model' section "
            f"(found: {keys}). Config files such as tokenizer_config.json or config.json are not "
            f"tokenizers; pass the tokenizer.json next to them."
        )
    return TokenizerError(
        f"{str(file)!r} could not be loaded as a Hugging Face tokenizer.json by "
        f"tokenizers {tokenizers.__version__}: {error}. Re-download or re-save the file."
    )


class Tokenizer:
    """A loaded ``tokenizer.json``. Construct with :meth:`from_file`."""

    def __init__(self, tok: tokenizers.Tokenizer, path: str | os.PathLike | None = None):
        self._tok = tok
        self.path = Path(path) if path is not None else None
        self._added = tok.get_added_tokens_decoder()  # id -> AddedToken (has .content, .special)
        self._byte_level = isinstance(tok.decoder, _decoders.ByteLevel)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` file, or a checkpoint directory that contains one."""
        p = Path(path)
        if p.is_dir():
            file = p / TOKENIZER_FILENAME
            if not file.is_file():
                present = sorted(x.name for x in p.iterdir())[:12]
                hint = ""
                if (p / "vocab.json").exists() or (p / "tokenizer.model").exists():
                    hint = (
                        " The directory has a slow-tokenizer vocabulary (vocab.json/merges.txt or "
                        "tokenizer.model); save a fast tokenizer.json from it once with transformers "
                        "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir))."
                    )
                raise TokenizerError(
                    f"No {TOKENIZER_FILENAME} in checkpoint directory {str(p)!r} "
                    f"(it contains: {', '.join(present) or 'nothing'}). Pass the path of a Hugging "
                    f"Face tokenizer.json, or a model directory downloaded with its tokenizer files "
                    f"(e.g. `huggingface-cli download <repo> tokenizer.json tokenizer_config.json`).{hint}"
                )
        elif p.is_file():
            file = p
        else:
            raise TokenizerError(
                f"Tokenizer path {str(p)!r} does not exist. Pass a tokenizer.json file or a "
                f"checkpoint directory containing {TOKENIZER_FILENAME}."
            )
        try:
            tok = tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on schema errors
            raise _not_a_tokenizer(file, e) from None
        return cls(tok, file)

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, added tokens in the text matched whole."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and per-token ``(start, end)`` character offsets into ``text``.

        See the module docstring for the exact offset contract (overlapping spans only for
        multi-byte characters split across tokens; spans refer to the un-normalised input).
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, _cover_normalisation_gaps(enc.offsets, len(text))

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """``encode_with_offsets`` of every text, tokenised as one batch (in parallel where cores allow)."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [(enc.ids, _cover_normalisation_gaps(enc.offsets, len(text))) for enc, text in zip(encodings, texts)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. ``skip_special_tokens`` drops only tokens flagged special."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fewest_tokens(self, text_bytes: int) -> int:
        """A lower bound on the number of tokens of any text of ``text_bytes`` UTF-8 bytes (0 where
        this tokenizer gives none), to refuse a huge row as over-length without tokenising it.

        It holds for byte-level BPE whose alphabet covers all 256 bytes, with no normaliser or NFC:
        every byte of the (normalised) text then lies in exactly one token, a token stands for at
        most ``max_token_bytes`` of them (the longest vocabulary entry or added token), and NFC
        leaves at least 1/``NFC_MAX_SHRINK`` of the bytes (composing three Hangul jamo into one
        syllable keeps a third; the worst case, U+1FBE U+0308 U+0341 -> U+0390, 2/7).
        """
        bound = self._max_input_bytes_per_token
        return 0 if bound is None else -(-text_bytes // bound)

    @cached_property
    def _max_input_bytes_per_token(self) -> int | None:
        """The most UTF-8 bytes of input text one token can stand for, or None without such a bound."""
        if not self._byte_level or not isinstance(self._tok.model, tokenizers.models.BPE):
            return None
        if self._tok.normalizer is None:
            shrink = 1
        elif isinstance(self._tok.normalizer, tokenizers.normalizers.NFC):
            shrink = NFC_MAX_SHRINK
        else:
            return None
        if not _maps_text_to_bytes(self._tok.pre_tokenizer):
            return None
        vocab = self._tok.get_vocab(with_added_tokens=False)
        if any(ch not in vocab for ch in _BYTE_DECODER):  # a byte with no token could be dropped
            return None
        longest = max((len(t) for t in vocab), default=1)  # byte-level: one character per byte
        longest = max([longest] + [len(t.content.encode("utf-8")) for t in self._added.values()])
        return longest * shrink

    # -------------------------------------------------------------- vocabulary
    @cached_property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (largest id + 1)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry (byte-level form, e.g. ``"Ġworld"``) or added token."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise MissingTokenError(
                f"Token {token!r} is not in the vocabulary of tokenizer {self.where}. If it is a "
                f"chat-template control token, the tokenizer does not belong to that template's "
                f"model family."
            )
        return i

    def id_to_token(self, id: int) -> str:
        tok = self._tok.id_to_token(int(id))
        if tok is None:
            raise MissingTokenError(
                f"Token id {id} is not in tokenizer {self.where} (vocab_size={self.vocab_size})."
            )
        return tok

    def is_special(self, id: int) -> bool:
        """True for added tokens flagged ``special`` (``<|im_end|>``; not Qwen's ``<tool_call>``)."""
        t = self._added.get(int(id))
        return bool(t is not None and t.special)

    def is_added(self, id: int) -> bool:
        """True for any added token (matched whole in text), special or not."""
        return int(id) in self._added

    def token_bytes(self, id: int) -> bytes:
        """The exact bytes one token contributes to decoded text (UTF-8 of an added token)."""
        id = int(id)
        if id in self._added:
            return self._added[id].content.encode("utf-8")
        tok = self.id_to_token(id)
        if self._byte_level and all(c in _BYTE_DECODER for c in tok):
            return bytes(_BYTE_DECODER[c] for c in tok)
        return self._tok.decode([id], skip_special_tokens=False).encode("utf-8")

    def piece(self, id: int) -> str:
        """Printable form of one token, for token audits.

        The token's bytes (:meth:`token_bytes`) are decoded as UTF-8; every byte that is not part
        of a complete, valid UTF-8 character (a byte-level token holding part of an emoji or CJK
        character) is shown as ``<0xE4>`` (two upper-case hex digits). In the decoded text
        ``\\n``, ``\\t``, ``\\r`` and the backslash itself are shown as the two-character escapes
        ``\\n``, ``\\t``, ``\\r``, ``\\\\``; any other non-printable character (per
        ``str.isprintable``, e.g. NUL, U+00A0, U+200B) is shown as ``\\xhh``, ``\\uhhhh`` or
        ``\\Uhhhhhhhh`` (lower-case hex). Everything else, including the plain space, is shown
        as is. Added tokens are shown as their literal text, e.g. ``<|im_end|>``.
        """
        return _render_bytes(self.token_bytes(id))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for anything not wrapped here)."""
        return self._tok

    @property
    def where(self) -> str:
        """The tokenizer's file, for messages."""
        return repr(str(self.path)) if self.path is not None else "<in memory>"

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.where}, vocab_size={self.vocab_size})"
