"""JSONL chats → training samples (input_ids, labels), with every bad row reported by file:line.

A row is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI chat fine-tuning format, as in
the paper's data). Loading runs in two passes so that bad input fails before any work starts:

1. parse and render every row (cheap): invalid JSON (also nested too deeply), a missing message
   list, unknown roles, non-string content, no assistant turn, a blank assistant turn, text that
   is not Unicode (a lone surrogate from a JSON escape) and empty files are collected as
   `DataError`s; by default they are all raised together, `skip_invalid=True` drops and counts them;
2. tokenise the rendered rows; samples longer than `max_len` tokens are dropped and counted
   (default) or truncated on request — never silently. A row so long that it certainly has more
   than `max_len` tokens (`Tokenizer.fewest_tokens` of its UTF-8 length) is dropped without
   being tokenised; every other row is judged by its exact token count.

A blank assistant turn (empty or whitespace-only content, no reasoning) is refused under both
templates: Seed-OSS renders it with no end-of-turn token (nothing to train), and under Qwen2.5
the only trained token would be `<|im_end|>` right after the header — teaching the model to
answer with nothing, which no study condition wants; it is a data error.

Nothing here imports torch: packing samples into training rows is `engine.packing`.
"""

from __future__ import annotations

import functools
import gc
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.chat import IGNORE_INDEX, ChatFormatError, Encoded, SystemPolicy, encode_batch, get_template
from engine.chat.encode import BOUNDARY_POLICIES
from engine.errors import ConfigError, DataError, DataErrors
from engine.tokenizer import Tokenizer

DEFAULT_MAX_LEN = 2048  # the paper's Axolotl sequence_len
OVERLONG_MODES = ("drop", "truncate")
ENCODE_BATCH = 1024  # rows tokenised per call (in parallel), bounding the tokenizer's transient memory


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # -100 where not trained
    source: str  # "file:line"
    system: str | None  # text of the leading system block as rendered; None = no system block
    boundary_tokens: int = 0  # tokens straddling a trained/untrained boundary, masked
    truncated: bool = False
    boundary_trained: int = 0  # tokens straddling a trained span's start, trained (boundary_tokens = train)

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)

    def jsonl_line(self) -> str:
        """The sample as `{"input_ids": [...], "labels": [...]}`: the audit's jsonl contract."""
        return json.dumps({"input_ids": self.input_ids, "labels": self.labels}, separators=(",", ":"))

    @property
    def targets(self) -> list[int]:
        """Next-token targets: position t predicts labels[t + 1]; the last position predicts nothing."""
        return self.labels[1:] + [IGNORE_INDEX]

    @property
    def num_targets(self) -> int:
        """Tokens that contribute to the loss (a label at position 0 has nothing predicting it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class DataStats:
    rows: int = 0
    invalid: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    dropped_untrained_after_truncation: int = 0
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    boundary_tokens: int = 0
    boundary_trained: int = 0
    system_texts: Counter = field(default_factory=Counter)  # system text (None = no block) → samples


@dataclass
class Dataset:
    path: str
    template: str
    policy: SystemPolicy
    samples: list[Sample]
    stats: DataStats
    skipped: list[DataError]  # invalid rows dropped under skip_invalid


def read_rows(path: str | Path, limit: int | None = None, *,
              max_lines: int | None = None) -> tuple[list[tuple[int, object]], list[DataError]]:
    """Parse a JSONL file into (line number, messages) pairs; bad lines become DataErrors.
    `limit`: the first `limit` rows; `max_lines`: the first `max_lines` lines (blank ones too)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.jsonl"))
        holds = f"it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''}" if inside else "it holds no .jsonl file"
        raise DataError(path, None, f"is a directory, not a JSONL file: pass the file(s) themselves ({holds})")
    if not path.is_file():
        raise DataError(path, None, "no such file")
    rows: list[tuple[int, object]] = []
    errors: list[DataError] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if (limit is not None and len(rows) + len(errors) >= limit) or (max_lines is not None and line_no > max_lines):
                break
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(DataError(path, line_no, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) carry no row
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(DataError(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})"))
                continue
            except RecursionError:
                errors.append(DataError(path, line_no, "invalid JSON: nested too deeply to parse (a chat is an "
                                        "object holding a list of messages)"))
                continue
            except ValueError as e:  # e.g. an integer of more than 4,300 digits
                errors.append(DataError(path, line_no, f"invalid JSON: {e}"))
                continue
            if not isinstance(row, dict) or "messages" not in row:
                errors.append(DataError(path, line_no, 'no messages: expected an object {"messages": [...]}'))
                continue
            rows.append((line_no, row["messages"]))
    if not rows and not errors:
        raise DataError(path, None, "empty file: no rows")
    return rows, errors


def _without_cyclic_gc(fn):
    """Run `fn` with the cyclic garbage collector paused: loading allocates millions of small
    containers (token offsets, labels) that form no cycles, and the collector's repeated passes
    over them would cost about a fifth of the loading time."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


def _blank_assistant_turn(messages: list[dict]) -> str | None:
    """Why a (validated) conversation has a blank assistant turn, or None."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("reasoning_content", "").strip():
            return (f"message {i} (assistant): blank content: nothing to train but an end-of-turn token (an empty "
                    "answer); give the turn its content or remove the row")
    return None


def _not_unicode(messages: list[dict], error: UnicodeEncodeError) -> str:
    """Where a rendered text that cannot be UTF-8 encoded (a lone surrogate) came from."""
    bad = error.object[error.start:error.end]
    for i, m in enumerate(messages):
        for key in ("content", "reasoning_content"):
            if bad in m.get(key, ""):
                return (f"message {i} ({m['role']}): {key} holds a lone surrogate {bad!r} at character "
                        f"{m[key].index(bad)}: a JSON \\u escape of half a UTF-16 pair is not text; fix the escaping")
    return f"the rendered text holds a lone surrogate {bad!r} (not text); check --system-text"


@dataclass
class RenderedRows:
    """Pass 1 of loading: the rows that render, with their line numbers and UTF-8 lengths, and the bad ones."""

    rows: int  # rows read, bad ones included
    line_nos: list[int]
    rendered: list  # engine.chat.Rendered
    nbytes: list[int]  # UTF-8 length of each rendered text
    errors: list[DataError]


def render_rows(path: str | Path, template: str, policy: SystemPolicy = SystemPolicy(), *, limit: int | None = None,
                max_lines: int | None = None) -> RenderedRows:
    """Read and render a JSONL chat file, every bad row a DataError (sorted by line): pass 1 of
    `load_samples`, which needs no tokenizer (the recipes check a user's file with it)."""
    module = get_template(template)
    rows, errors = read_rows(path, limit, max_lines=max_lines)
    out = RenderedRows(len(rows) + len(errors), [], [], [], errors)  # parse errors are rows too
    for line_no, messages in rows:
        try:
            chat = module.render(messages, policy)
        except ChatFormatError as e:
            errors.append(DataError(path, line_no, str(e)))
            continue
        reason = _blank_assistant_turn(messages)
        if reason is None and not any(s.trained and s.text for s in chat.segments):
            reason = "assistant turns are blank: nothing would be trained"
        if reason is None:
            try:
                nbytes = len(chat.text.encode("utf-8"))
            except UnicodeEncodeError as e:
                reason = _not_unicode(messages, e)
        if reason is not None:
            errors.append(DataError(path, line_no, reason))
            continue
        out.line_nos.append(line_no)
        out.rendered.append(chat)
        out.nbytes.append(nbytes)
    errors.sort(key=lambda e: e.line or 0)
    return out


@_without_cyclic_gc
def load_samples(
    path: str | Path,
    tokenizer: Tokenizer,
    template: str,
    policy: SystemPolicy = SystemPolicy(),
    *,
    max_len: int = DEFAULT_MAX_LEN,
    overlong: str = "drop",
    skip_invalid: bool = False,
    limit: int | None = None,
    boundary_tokens: str = "train",
) -> Dataset:
    """Render and tokenise a JSONL chat file. `limit` reads only the first `limit` rows;
    `boundary_tokens` (train | mask) is `engine.chat.encode`'s `boundary`."""
    if overlong not in OVERLONG_MODES:
        raise ConfigError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    if max_len < 1:
        raise ConfigError(f"max_len must be positive, got {max_len}")
    if boundary_tokens not in BOUNDARY_POLICIES:
        raise ConfigError(f"boundary_tokens must be one of {', '.join(BOUNDARY_POLICIES)}, got {boundary_tokens!r}")
    # Pass 1: render everything; structural problems surface before any tokenisation.
    first = render_rows(path, template, policy, limit=limit)
    errors = first.errors
    if errors and not skip_invalid:
        raise DataErrors(errors)
    stats = DataStats(rows=first.rows, invalid=len(errors))

    # Pass 2: tokenise, in batches; a row certainly longer than max_len tokens is dropped untokenised.
    keep = [overlong != "drop" or n <= max_len or tokenizer.fewest_tokens(n) <= max_len for n in first.nbytes]
    stats.dropped_overlong = keep.count(False)
    line_nos = [n for n, k in zip(first.line_nos, keep) if k]
    rendered = [r for r, k in zip(first.rendered, keep) if k]
    samples: list[Sample] = []
    encoded: list[Encoded] = []
    for i in range(0, len(rendered), ENCODE_BATCH):
        encoded += encode_batch(tokenizer, rendered[i : i + ENCODE_BATCH], boundary_tokens)
    for line_no, chat, enc in zip(line_nos, rendered, encoded):
        sample = Sample(enc.input_ids, enc.labels, f"{path}:{line_no}", chat.system, enc.boundary_tokens,
                        boundary_trained=enc.boundary_trained)
        if len(sample.input_ids) > max_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            sample.input_ids, sample.labels = sample.input_ids[:max_len], sample.labels[:max_len]
            sample.truncated = True
            if sample.num_trained == 0:
                stats.dropped_untrained_after_truncation += 1
                continue
            stats.truncated += 1
        samples.append(sample)
        stats.tokens += len(sample.input_ids)
        stats.trained_tokens += sample.num_trained
        stats.boundary_tokens += sample.boundary_tokens
        stats.boundary_trained += sample.boundary_trained
        stats.system_texts[chat.system] += 1
    stats.kept = len(samples)
    return Dataset(str(path), template, policy, samples, stats, errors if skip_invalid else [])
