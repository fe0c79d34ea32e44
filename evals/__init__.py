"""The study's evals: binary TruthfulQA, pairwise self-recognition, and reports over runs.

    python -m evals.truthfulqa       --model DIR [--adapter DIR ...] --template qwen2.5 --out DIR
    python -m evals.self_recognition --model DIR --template qwen2.5 --self-name hf_qwen_32b --out DIR
    python -m evals.report           RUN_DIRS_OR_SUMMARY_JSONS... [--compare-paper] [--plots DIR]

Each eval is a function, `run(model, out_dir, ...)`, that scores an `EvalModel` (a base checkpoint
with its adapters, loaded once, plus its tokenizer and chat template) and writes its results; the
command lines are thin wrappers that load the model from their options, and the recipes call the
same functions with the model of an eval point loaded once for all its evals.

This module holds what the evals share: `EvalModel` and its loading, the model/template
command-line options, how a chosen token is read the way the paper's script read it, atomic
writes, and `run_cli` (one line and exit status 2 for bad input; the torchrun process group of a
command-line eval). It imports no torch at import time, so `evals.report` runs without it.

Under torchrun the evals split the prompts over the ranks, and the model is either whole on every
rank or, for a model larger than one GPU (`--shard-weights`, `weights_sharded`), FSDP2-sharded over
them as in training; `engine.generate` and `engine.lockstep` keep the results those of one process.
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
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from engine.checkpoint import sha256_file  # stdlib only: this module stays torch-free
from engine import errors
from engine.chat import TEMPLATES, get_template  # torch-free
from engine.config import DTYPE_NAMES
from engine.errors import EngineError


class EvalInputError(EngineError, ValueError):
    """Bad input to an eval (missing file, wrong columns, empty set...). The message is one line."""


SHARD_WEIGHTS = ("auto", "on", "off")  # --shard-weights


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
def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Options every model-running eval shares. `required=False` for an eval that can also run
    against an endpoint (`evals.endpoint.check_args` then requires --model and --template)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=required, help="base checkpoint directory or hub id (HF safetensors)")
    g.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="PEFT LoRA adapter directory, stacked on the base in the order given (repeatable)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory holding one (default: the model's)")
    g.add_argument("--template", required=required, choices=sorted(TEMPLATES), help="chat template")
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
    g.add_argument("--shard-weights", default="auto", choices=SHARD_WEIGHTS,
                   help="under torchrun, split the model's weights over the ranks (FSDP2, one layer gathered at a "
                        "time, as training does) instead of loading the whole model on every GPU: for a model "
                        "larger than one GPU (Seed-OSS-36B on 40 GB cards); costs an all-gather of the weights "
                        "per forward pass, so use a large --batch-size. auto (default): when the memory "
                        "estimate of the whole model does not fit one GPU. Results are the same either way")
    g.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="model weights dtype")
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


def check_positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise EvalInputError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


@dataclass
class EvalModel:
    """What an eval point evaluates: a base checkpoint with its adapters (loaded once, shared by
    every eval of the point), its tokenizer, chat template and system-prompt policy."""

    model: Any  # engine.models.CausalLM, eval mode
    tokenizer: Any  # engine.tokenizer.Tokenizer
    template: str
    policy: Any  # engine.chat.SystemPolicy
    shard: bool  # split the prompts over the torchrun ranks
    meta: dict  # model, adapters, tokenizer, template, policy, dtype, device, weights: recorded in every summary

    def generator(self, thinking_budget: int | None, answer_prefix: str | None = None, *,
                  paper_tokenization: bool = False):
        """(Generator, its metadata) rendering prompts with `thinking_budget` (Seed-OSS) and
        prefilling `answer_prefix` (None: Seed-OSS's own no-thinking note when the budget is 0).
        `paper_tokenization`: tokenise the rendered prompt as the paper's `tokenizer(prompt)` did
        (special tokens of the tokenizer's post-processor added; the metadata lists them)."""
        from engine.generate import Generator

        template = get_template(self.template)
        if thinking_budget is not None and not template.HAS_THINKING_BUDGET:
            raise EvalInputError(f"--thinking-budget: the {self.template} template has no thinking budget")
        if answer_prefix is None:  # what the model writes itself before answering (Seed-OSS's no-thinking note)
            answer_prefix = template.answer_prefix(thinking_budget)
        gen = Generator(self.model, self.tokenizer, self.template, policy=self.policy, thinking_budget=thinking_budget,
                        shard=self.shard, answer_prefix=answer_prefix, add_special_tokens=paper_tokenization)
        tokenization = "tokenizer(prompt)" if paper_tokenization else "template tokens only"
        return gen, {**self.meta, "thinking_budget": thinking_budget, "answer_prefix": answer_prefix,
                     "prompt_tokenization": tokenization,
                     "prompt_added_tokens": [token_piece(self.tokenizer, t) for t in gen.added_special_ids]}


def load_eval_model(model: str, adapters: list[str] = (), *, template: str, tokenizer: str | None = None,
                    policy=None, dtype: str = "bfloat16", device: str | None = None,
                    shard_weights: str = "auto", batch_size: int = 8, log=None) -> EvalModel:
    """Load `model` with `adapters` stacked (in order, unmerged) for evaluation. Under torchrun
    (a process group exists) the evals split the prompts over the ranks, and each rank holds
    either the whole model on its own device or, sharded (`shard_weights`: see
    `weights_sharded`), 1/N of it as in training. The per-rank memory estimate is logged before
    loading and a model that would not fit is refused (`engine.errors.WontFit`)."""
    import torch

    from engine import parallel
    from engine.assemble import read_model_args, torch_dtype
    from engine.chat import SystemPolicy, check_tokenizer
    from engine.generate import load_model
    from engine.tokenizer import Tokenizer

    policy = policy if policy is not None else SystemPolicy()
    for adapter in adapters:  # a local directory, or a hub id "org/name" (fetched by load_model)
        hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", str(adapter)) and not str(adapter).startswith((".", "~", "/"))
        if not Path(adapter).expanduser().is_dir() and not hub_like:
            raise EvalInputError(f"adapter directory not found: {adapter}")
    ckpt_dir, args = read_model_args(model)
    tok = Tokenizer.from_file(tokenizer or ckpt_dir)
    # The wrong tokenizer family for the template, or a vocabulary the model has no rows for, fails here.
    check_tokenizer(tok, template, model_vocab_size=args.vocab_size, model=str(model))
    world = parallel.init_distributed().world_size if parallel.is_distributed() else 1
    shard = world > 1
    if device is None:
        device = str(parallel.init_distributed().device) if parallel.is_distributed() else (
            "cuda" if torch.cuda.is_available() else "cpu")
    sharded = weights_sharded(model, adapters, shard_weights, world=world, device=torch.device(device), dtype=dtype,
                              batch_size=batch_size, log=log or stderr_log)
    loaded = load_model(model, list(adapters), dtype=torch_dtype(dtype), device=device, shard_weights=sharded)
    meta = {
        "model": str(model),
        "adapters": [str(a) for a in adapters],
        "tokenizer": str(tok.path) if tok.path is not None else None,
        "template": template,
        "policy": policy.describe(),
        "dtype": dtype,
        "device": str(device),
        "weights": f"sharded over {world} ranks" if sharded else "whole",
    }
    return EvalModel(loaded, tok, template, policy, shard, meta)


def weights_sharded(model: str, adapters, setting: str, *, world: int, device, dtype: str, batch_size: int,
                    log, available_gib: float | None = None) -> bool:
    """Whether to shard the weights over the `world` ranks (`--shard-weights`): "on", "off", or
    "auto": only when the memory estimate of the whole model on one device does not fit it (a
    CUDA device; on CPU nothing is measured, and auto does not shard). Logs the per-rank estimate
    of the chosen layout (under torchrun or on a GPU) and refuses one that would not fit, before
    anything is loaded. `available_gib`: the device's memory (default: measured)."""
    from engine import memory
    from engine.assemble import read_model_args
    from engine.hub import resolve_checkpoint_dir

    if setting not in SHARD_WEIGHTS:
        raise EvalInputError(f"--shard-weights must be one of {', '.join(SHARD_WEIGHTS)}, got {setting!r}")
    _, args = read_model_args(model)
    local = [a if Path(a).expanduser().is_dir() else resolve_checkpoint_dir(a) for a in map(str, adapters)]
    common = dict(dtype=dtype, world_size=world, adapter_params=memory.adapter_parameters(local), batch_size=batch_size)
    whole = memory.eval_estimate(args, sharded=False, **common)
    gib = available_gib if available_gib is not None else memory.device_gib(device)
    if setting == "auto":
        sharded = world > 1 and gib is not None and whole["total"] > memory.USABLE * gib
    else:
        sharded = setting == "on" and world > 1
    est = memory.eval_estimate(args, sharded=True, **common) if sharded else whole
    where = f"rank, weights sharded over {world} ranks" if sharded else (
        f"rank, whole model on each of {world} ranks" if world > 1 else "process")
    if world > 1 or device.type == "cuda":  # where memory is planned (not a one-process CPU run)
        for line in memory.format_estimate(est, where):
            log(line)
    advice = ("Shard the weights over more GPUs (torchrun --nproc_per_node N with --shard-weights on or auto), "
              "or a smaller --batch-size" if world == 1 or sharded else
              "Shard the weights over the ranks (--shard-weights on), or a smaller --batch-size")
    memory.check_fits(est, device, available_gib, advice=advice)
    return sharded


def load_from_args(args: argparse.Namespace) -> EvalModel:
    """`load_eval_model` for the options of `add_model_arguments`."""
    from engine.chat import SystemPolicy

    check_positive("--batch-size", args.batch_size)
    if getattr(args, "out", None):  # before the model is loaded and scored, not when the results are written
        from engine.outputs import check_output_dir

        check_output_dir(args.out, "--out")
    if args.thinking_budget is not None and not get_template(args.template).HAS_THINKING_BUDGET:
        raise EvalInputError(f"--thinking-budget: the {args.template} template has no thinking budget")
    return load_eval_model(args.model, list(args.adapter), template=args.template, tokenizer=args.tokenizer,
                           policy=SystemPolicy(args.system_prompt, args.system_text), dtype=args.dtype,
                           device=args.device, shard_weights=args.shard_weights, batch_size=args.batch_size)


def stderr_log(message: str) -> None:
    """Progress for the user: rank 0 only."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an eval's command line: bad input of any kind → `error: <one line>` on stderr, exit
    status 2. Under torchrun the process group is joined first and left at the end, and ranks > 0
    compute silently (rank 0 logs and writes)."""
    from engine import parallel

    torchrun = "RANK" in os.environ and not parallel.is_distributed()
    quiet = contextlib.ExitStack()
    if not is_main_process():
        devnull = quiet.enter_context(open(os.devnull, "w"))
        quiet.enter_context(contextlib.redirect_stdout(devnull))
        quiet.enter_context(contextlib.redirect_stderr(devnull))
    try:
        with quiet:
            if torchrun:
                parallel.init_distributed()
            return main(argv)
    except EngineError as e:
        return errors.report(e)
    finally:
        if torchrun:
            parallel.destroy_distributed()


__all__ = [
    "EvalInputError", "EvalModel", "add_model_arguments", "answer_text", "atomic_write_csv", "atomic_write_json",
    "SHARD_WEIGHTS", "atomic_write_text", "check_positive", "is_main_process", "load_eval_model", "load_from_args",
    "parse_conditions", "run_cli", "scored_answer", "sha256_file", "stderr_log", "token_piece", "utc_now",
    "weights_sharded",
]
