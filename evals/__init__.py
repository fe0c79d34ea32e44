"""The study's evals: binary TruthfulQA, pairwise self-recognition, and reports over runs.

    python -m evals.truthfulqa       --model DIR [--adapter DIR ...] --template qwen2.5 --out DIR
    python -m evals.self_recognition --model DIR --template qwen2.5 --self-name hf_qwen_32b --out DIR
    python -m evals.report           RUN_DIRS_OR_SUMMARY_JSONS... [--compare-paper] [--plots DIR]

This module holds what the eval entry points share: the model/template command-line options,
loading a `Generator`, how a chosen token is read the way the paper's script read it, atomic
writes, and the one-line error convention (exit status 2). It imports no torch at import time, so
`evals.report` runs on a machine without it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.checkpoint import sha256_file  # stdlib only: this module stays torch-free
from engine import errors
from engine.chat import TEMPLATES, get_template, special_ids  # torch-free
from engine.errors import EXIT_BAD_INPUT, EngineError, one_line
_owns_process_group = False  # load_generator started the torchrun process group itself
DTYPES = ("bfloat16", "float16", "float32")


class EvalInputError(EngineError, ValueError):
    """Bad input to an eval (missing file, wrong columns, empty set...). The message is one line."""


# ------------------------------------------------------------------------------------- writing
def is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun-launched eval (they compute, rank 0 writes)."""
    return int(os.environ.get("RANK", "0")) == 0


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same directory and a rename: a reader
    (or a killed process) never sees a half-written file. Under torchrun only rank 0 writes."""
    path = Path(path)
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def atomic_write_csv(path: str | os.PathLike, fieldnames: list[str], rows: Iterable[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------ reading the model's answer
def answer_text(tokenizer, token_id: int) -> str:
    """The text the paper's script compared for a generated token: HF
    `decode(..., skip_special_tokens=True).strip()` (its inference engine strips, and so does its
    model runner). So " A" counts as "A", while a control token (`<|im_end|>`, `<seed:think>`)
    decodes to "" and is Invalid. So does an id beyond the tokenizer's vocabulary (the padding
    rows of an LM head: Qwen2.5-32B's head has 152,064 rows for 151,665 tokens)."""
    if not 0 <= int(token_id) < tokenizer.vocab_size:
        return ""
    return tokenizer.decode([int(token_id)], skip_special_tokens=True).strip()


def token_piece(tokenizer, token_id: int) -> str:
    """Printable form of a token for result files; `<id N>` for an id the tokenizer lacks."""
    from engine.tokenizer import MissingTokenError

    try:
        return tokenizer.piece(int(token_id))
    except MissingTokenError:
        return f"<id {int(token_id)}>"


def scored_answer(tokenizer, token_id: int, valid: tuple[str, ...]) -> str:
    """`answer_text` if it is one of `valid`, else "Invalid" (the paper's scoring)."""
    text = answer_text(tokenizer, token_id)
    return text if text in valid else "Invalid"


# -------------------------------------------------------------------------- command line
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every model-running eval shares."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, help="base checkpoint directory or hub id (HF safetensors)")
    g.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="PEFT LoRA adapter directory, stacked on the base in the order given (repeatable)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory holding one (default: the model's)")
    g.add_argument("--template", required=True, choices=sorted(TEMPLATES), help="chat template")
    g.add_argument("--system-prompt", default="default", choices=("default", "empty", "omit", "replace"),
                   help="system-prompt policy (default: the template's own behaviour, as the paper)")
    g.add_argument("--system-text", default=None, help="system text for --system-prompt replace")
    g.add_argument("--thinking-budget", type=int, default=None,
                   help="Seed-OSS thinking budget (-1: unlimited, as the template without one; 0: no thinking); "
                        "default depends on the eval and mode; not allowed with qwen2.5")
    g.add_argument("--answer-prefix", default=None,
                   help="text prefilled at the start of every answer; default: Seed-OSS's own no-thinking note "
                        "when thinking_budget is 0, else none ('' for none)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    g.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="model weights dtype")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata stored in the summary for the report, e.g. condition=EM-then-SGTR seed=0 (repeatable)")


def parse_conditions(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalInputError(f"--condition expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def resolve_thinking_budget(template: str, requested: int | None, default: int | None) -> int | None:
    """The thinking budget to render with: `requested`, else the eval's `default` where the
    template has a thinking budget (Seed-OSS); None where it has none (Qwen2.5)."""
    if not get_template(template).HAS_THINKING_BUDGET:
        if requested is not None:
            raise EvalInputError(f"--thinking-budget: the {template} template has no thinking budget")
        return None
    return default if requested is None else requested


def policy_from_args(args: argparse.Namespace):
    from engine.chat import SystemPolicy

    return SystemPolicy(args.system_prompt, args.system_text)


def check_positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise EvalInputError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def load_generator(args: argparse.Namespace, thinking_budget: int | None):
    """(Generator, Tokenizer, metadata dict) for the model options in `args`."""
    import torch

    from engine.generate import Generator, load_model
    from engine.models.loading import resolve_checkpoint_dir
    from engine.tokenizer import Tokenizer

    policy = policy_from_args(args)
    check_positive("--batch-size", args.batch_size)
    answer_prefix = args.answer_prefix
    if answer_prefix is None:  # what the model writes itself before answering (Seed-OSS's no-thinking note)
        answer_prefix = get_template(args.template).answer_prefix(thinking_budget)
    for adapter in args.adapter:  # a local directory, or a hub id "org/name" (fetched by load_model)
        hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", adapter) and not adapter.startswith((".", "~"))
        if not Path(adapter).expanduser().is_dir() and not hub_like:
            raise EvalInputError(f"adapter directory not found: {adapter}")
    tokenizer = Tokenizer.from_file(args.tokenizer or resolve_checkpoint_dir(args.model))
    special_ids(tokenizer, args.template)  # the wrong tokenizer family for the template fails here, clearly
    # Under torchrun the prompts are split over the ranks (each holds the whole model on its own GPU)
    # and the results gathered; rank 0 writes and logs.
    from engine import parallel

    global _owns_process_group
    sharded = "RANK" in os.environ
    if sharded and not parallel.is_distributed():
        _owns_process_group = True  # started here, so ended by run_cli (not when a recipe runs us)
    device = args.device or (str(parallel.init_distributed().device) if sharded else
                             "cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, list(args.adapter), dtype=getattr(torch, args.dtype), device=device)
    gen = Generator(model, tokenizer, args.template, policy=policy, thinking_budget=thinking_budget, shard=sharded,
                    answer_prefix=answer_prefix)
    meta = {
        "model": str(args.model),
        "adapters": [str(a) for a in args.adapter],
        "tokenizer": str(tokenizer.path) if tokenizer.path is not None else None,
        "template": args.template,
        "policy": policy.describe(),
        "thinking_budget": thinking_budget,
        "answer_prefix": answer_prefix,
        "dtype": args.dtype,
        "device": str(device),
    }
    return gen, tokenizer, meta


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an eval's main; bad input of any kind → `error: <one line>` on stderr, exit status 2."""
    global _owns_process_group
    quiet = contextlib.ExitStack()
    if not is_main_process():  # ranks > 0 compute; rank 0 logs and writes
        devnull = quiet.enter_context(open(os.devnull, "w"))
        quiet.enter_context(contextlib.redirect_stdout(devnull))
        quiet.enter_context(contextlib.redirect_stderr(devnull))
    try:
        with quiet:
            return main(argv)
    except EngineError as e:
        return errors.report(e)
    finally:
        if _owns_process_group:
            from engine import parallel

            parallel.destroy_distributed()
            _owns_process_group = False


__all__ = [
    "DTYPES", "EXIT_BAD_INPUT", "EvalInputError", "add_model_arguments", "answer_text", "atomic_write_csv",
    "atomic_write_json", "atomic_write_text", "check_positive", "token_piece", "load_generator", "one_line", "parse_conditions",
    "policy_from_args", "resolve_thinking_budget", "run_cli", "scored_answer", "sha256_file", "utc_now",
]
