"""The user-facing errors: one base class, one way to report them.

Every problem a user can cause — a bad setting, a bad data row, a checkpoint that does not fit
the model, an adapter for another base, a run directory that cannot be resumed — is raised as a
subclass of `EngineError`, with a message that says where (file, line or key), what is wrong and
what to do. Every entry point's `main()` catches `EngineError` (and only it) and reports it with
`report`: one line on stderr, exit status 2, nothing half-written. Anything else is a bug and
keeps its traceback.

Each class keeps the built-in exception it used to be (`ValueError`, `KeyError`, ...) as a second
base, so code that catches those still works.

The classes of the engine itself live here; `evals` and `recipes` add their own
(`EvalInputError`, `RecipeError`, `DatasetError`, ...) on the same base.
"""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


class EngineError(Exception):
    """Base of every user-facing error."""


class ConfigError(EngineError, ValueError):
    """A setting that is missing, unknown or invalid: a TOML file, a --key=value override, or a
    checkpoint's config.json describing an architecture the engine does not support."""


class ChatFormatError(EngineError, ValueError):
    """A conversation, chat template or system-prompt policy the renderer cannot render exactly."""


class TokenizerError(EngineError, ValueError):
    """A tokenizer file that is missing or unusable, or that does not fit the chat template."""


class MissingTokenError(TokenizerError, KeyError):
    """A token (usually a model family's control token) is not in the tokenizer's vocabulary."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it verbatim instead.
        return str(self.args[0]) if self.args else ""


class DataError(EngineError, ValueError):
    """One bad input row (or a bad file), printed as `file:line: reason`."""

    def __init__(self, path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{self.path}:{line}: {reason}" if line is not None else f"{self.path}: {reason}")


class DataErrors(EngineError, ValueError):
    """Several bad rows at once, so that the user fixes them in one go rather than one per run."""

    def __init__(self, errors: list[DataError], shown: int = 20):
        self.errors = errors
        lines = [str(e) for e in errors[:shown]]
        if len(errors) > shown:
            lines.append(f"... and {len(errors) - shown} more")
        hint = "fix these rows, or pass --skip-invalid to drop and count them"
        super().__init__(f"{len(errors)} invalid row(s):\n" + "\n".join(lines) + f"\n({hint})")


class CheckpointError(EngineError, ValueError):
    """A model checkpoint that cannot be loaded as given (missing, unexpected or mis-shaped tensors)."""


class SaveError(EngineError, ValueError):
    """A checkpoint that cannot be written (target exists, shapes do not match the config)."""


class LoraError(EngineError, ValueError):
    """A LoRA configuration or a PEFT adapter the engine cannot use exactly."""


class WontFit(EngineError, ValueError):
    """The memory estimate of a step exceeds the device's memory."""


class RunDirError(EngineError, ValueError):
    """A run directory that is missing, damaged, or holds a run other than the one asked for."""


class TrainingError(EngineError, RuntimeError):
    """A training run that cannot start, continue or finish as asked (the message says why)."""


class WriteError(EngineError, OSError):
    """A file of a run that could not be written (a full disk, no permission): the message names the
    file and the step; what was written before, the last good checkpoint included, is intact."""


def one_line(error: BaseException) -> str:
    """A (possibly multi-line) message folded into one line."""
    parts = [p.strip() for p in str(error).splitlines() if p.strip()]
    return "; ".join(parts) if parts else type(error).__name__


def report(error: BaseException, rank: int | None = None) -> int:
    """Print `error: <message>` (with the rank under torchrun) as one line on stderr; return 2."""
    where = f" (rank {rank})" if rank is not None else ""
    print(f"error{where}: {one_line(error)}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT
