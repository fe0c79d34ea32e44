"""JSONL chats → training samples (input_ids, labels), with every bad row reported by file:line.

A row is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI chat fine-tuning format, as in
the paper's data). Loading runs in two passes so that bad input fails before any work starts:

1. parse and render every row (cheap): invalid JSON, a missing message list, unknown roles,
   non-string content, no assistant turn, blank assistant turns and empty files are collected as
   `DataError`s; by default they are all raised together, `skip_invalid=True` drops and counts them;
2. tokenise the rendered rows; samples longer than `max_len` are dropped and counted (default) or
   truncated on request — never silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from engine.chat import IGNORE_INDEX, ChatFormatError, SystemPolicy, encode, get_template
from engine.chat.base import apply_policy
from engine.chat.encode import BOUNDARY_POLICIES
from engine.errors import ConfigError, DataError, DataErrors
from engine.tokenizer import Tokenizer

DEFAULT_MAX_LEN = 2048  # the paper's Axolotl sequence_len
OVERLONG_MODES = ("drop", "truncate")


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
        return sum(label != IGNORE_INDEX for label in self.labels)

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


def read_rows(path: str | Path, limit: int | None = None) -> tuple[list[tuple[int, object]], list[DataError]]:
    """Parse a JSONL file into (line number, messages) pairs; bad lines become DataErrors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file")
    rows: list[tuple[int, object]] = []
    errors: list[DataError] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if limit is not None and len(rows) + len(errors) >= limit:
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
            if not isinstance(row, dict) or "messages" not in row:
                errors.append(DataError(path, line_no, 'no messages: expected an object {"messages": [...]}'))
                continue
            rows.append((line_no, row["messages"]))
    if not rows and not errors:
        raise DataError(path, None, "empty file: no rows")
    return rows, errors


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
    module = get_template(template)
    rows, errors = read_rows(path, limit)
    total_rows = len(rows) + len(errors)  # parse errors are rows too

    # Pass 1: render everything; structural problems surface before any tokenisation.
    rendered = []
    for line_no, messages in rows:
        try:
            segments = module.render(messages, policy)
        except ChatFormatError as e:
            errors.append(DataError(path, line_no, str(e)))
            continue
        if not any(s.trained and s.text for s in segments):
            errors.append(DataError(path, line_no, "assistant turns are blank: nothing would be trained"))
            continue
        system = apply_policy(messages, policy, module.DEFAULT_SYSTEM)[0]
        rendered.append((line_no, segments, system))
    errors.sort(key=lambda e: e.line or 0)
    if errors and not skip_invalid:
        raise DataErrors(errors)

    # Pass 2: tokenise.
    stats = DataStats(rows=total_rows, invalid=len(errors))
    samples: list[Sample] = []
    for line_no, segments, system in rendered:
        enc = encode(tokenizer, segments, boundary_tokens)
        sample = Sample(enc.input_ids, enc.labels, f"{path}:{line_no}", system, enc.boundary_tokens,
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
        stats.system_texts[system] += 1
    stats.kept = len(samples)
    return Dataset(str(path), template, policy, samples, stats, errors if skip_invalid else [])


# ---------------------------------------------------------------- packing


@dataclass
class PackedBatch:
    """Samples concatenated into one row; attention and positions restart at every boundary."""

    input_ids: torch.Tensor  # (1, T) int64
    targets: torch.Tensor  # (1, T) int64, IGNORE_INDEX where nothing is trained
    position_ids: torch.Tensor  # (1, T) int64, 0.. per sample
    cu_seqlens: torch.Tensor  # (n + 1,) int32, sample boundaries
    num_targets: int
    sources: list[str]

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.targets), move(self.position_ids),
                           move(self.cu_seqlens), self.num_targets, self.sources)


def pack(samples: Sequence[Sample], max_tokens: int) -> list[list[Sample]]:
    """Greedy, order-preserving packing into rows of at most `max_tokens` tokens.

    A sample longer than the budget gets a row of its own (it is never split: a split sample
    would lose the attention context of its first part).
    """
    rows: list[list[Sample]] = []
    used = max_tokens  # forces a new row for the first sample
    for s in samples:
        n = len(s.input_ids)
        if used + n > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += n
    return rows


def collate_packed(samples: Sequence[Sample]) -> PackedBatch:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    ids = [t for s in samples for t in s.input_ids]
    targets = [t for s in samples for t in s.targets]
    positions = [p for s in samples for p in range(len(s.input_ids))]
    bounds = [0]
    for s in samples:
        bounds.append(bounds[-1] + len(s.input_ids))
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        targets=torch.tensor([targets], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        num_targets=sum(s.num_targets for s in samples),
        sources=[s.source for s in samples],
    )
