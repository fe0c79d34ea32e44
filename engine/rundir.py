"""The run directory of a training run: its layout, its records and its checkpoints, in one place.

    out_dir/
      config.json           the resolved `TrainConfig`, the world size it ran on, and the SHA-256 of
                            every data file; a resumption with different settings or changed data
                            is refused (`RESUME_MAY_CHANGE` may differ)
      metrics.jsonl         one line per optimizer step: loss, lr, grad norm, tokens, tokens/s
      tokens.jsonl          the token manifest: per step, every sample's source and the SHA-256 of
                            its `{"input_ids": ..., "labels": ...}` line, in training order
      tokens/step_*.jsonl   with record_tokens: the full token streams, in the audit's jsonl format
      checkpoints/step_*/   adapter, optimizer and scheduler state, per-rank RNG (atomic, with a
                            manifest of SHA-256s: `engine.checkpoint`)
      adapter/              the final adapter, PEFT format
      stage_complete.json   written by a staged recipe once the run is a finished stage

The trainer, `python -m engine.audit --run` and the recipes read and write these only through
this module. It imports no torch at import time (the audit runs without it); the checkpoint
functions import torch and safetensors when called.

Every write that fails (a full disk) raises an OSError naming the file, also where torch's and
safetensors' own writers would not; what a failed write leaves is either a partial last line of a
log, which `RunRecords.truncate_after` drops on resumption, or a temporary (`.tmp-*`, `.*.tmp*`),
which `RunDir.remove_stale_temporaries` removes on the next start.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from engine import checkpoint
from engine.config import RESUME_MAY_CHANGE, SETTINGS_BEFORE_THEY_EXISTED, TrainConfig, config_diff
from engine.errors import RunDirError

CONFIG = "config.json"
RECORDED = {"world_size", "data_sha256"}  # what config.json holds besides the settings
METRICS = "metrics.jsonl"
TOKENS = "tokens.jsonl"
STREAMS = "tokens"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
STAGE_COMPLETE = "stage_complete.json"
ADAPTER_WEIGHTS = "adapter.safetensors"  # inside a checkpoint: the trainable adapters by our names
TRAINING_STATE = "optimizer.pt"  # inside a checkpoint: optimizer and scheduler state


def sample_hash(sample) -> str:
    """SHA-256 of a sample's line in the audit's jsonl format (`python -m engine.audit --format jsonl`)."""
    return hashlib.sha256(sample.jsonl_line().encode()).hexdigest()


def step_name(step: int) -> str:
    return checkpoint.step_dir_name(step)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n")


def _named(error: OSError, path: Path) -> OSError:
    """`error` naming `path` (an OSError raised by a write() names no file)."""
    if error.filename:
        return error
    return OSError(error.errno, error.strerror or str(error), str(path))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise _named(e, tmp) from None
    os.replace(tmp, path)


class _Recorder:
    """A file for torch.save that keeps the OSError of a failed write: torch's C++ writer replaces
    it by `basic_ios::clear: iostream error` or `unexpected pos`."""

    def __init__(self, f, path: Path):
        self.f, self.name, self.error = f, str(path), None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: Path) -> None:
    """torch.save; a failed write raises the OSError, naming `path`."""
    import torch

    try:
        with open(path, "wb") as f:
            recorder = _Recorder(f, path)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
    except OSError as e:
        raise _named(e, path) from None


def save_safetensors(tensors: dict, path: Path) -> None:
    """safetensors' save_file; a failed write raises an OSError naming `path` (safetensors' own
    error names no file)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise OSError(errno.EIO, str(e), str(path)) from None
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


# ---------------------------------------------------------------------------- data fingerprints


def fingerprint(paths: list[str] | tuple[str, ...]) -> dict[str, str]:
    """{path as given: SHA-256 of the file}: what a run records of its data files (config.json's
    `data_sha256`), and a recipe of its stage datasets. A missing file raises RunDirError."""
    out = {}
    for path in paths:
        if not Path(path).is_file():
            raise RunDirError(f"data file {path} is missing")
        out[str(path)] = checkpoint.sha256_file(path)
    return out


def fingerprint_changes(recorded: dict[str, str], paths: list[str] | tuple[str, ...]) -> list[str]:
    """What differs between `recorded` fingerprints and the files at `paths` now, one phrase per
    file ("data file X changed since the run started (SHA-256 ... then, ... now)", "... is
    missing"); empty when every file is as recorded."""
    changes = []
    for path in paths:
        path = str(path)
        if not Path(path).is_file():
            changes.append(f"data file {path} is missing")
        elif path not in recorded:
            changes.append(f"data file {path} was not part of the run")
        else:
            now = checkpoint.sha256_file(path)
            if now != recorded[path]:
                changes.append(f"data file {path} changed since the run started "
                               f"(SHA-256 {recorded[path][:12]}… then, {now[:12]}… now)")
    return changes


# ---------------------------------------------------------------------------- jsonl logs


def read_jsonl_records(path: Path) -> tuple[list[tuple[dict, str]], bool]:
    """(record, line) of every complete line of a run's jsonl log, and whether a partial last line
    (an interrupted append) was left out. Any other line that is not a JSON record raises
    RunDirError naming the file and the line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    last = lines.pop()  # "" when the file ends with a newline
    records = []
    for number, line in enumerate(lines + ([last] if last else []), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            if last and number == len(lines) + 1:
                return records, True
            raise RunDirError(f"{path}:{number}: not a JSON record: the run directory is damaged (restore the "
                              "file from a copy, or start a new run)") from None
        records.append((record, line))
    return records, False


class RunDir:
    """A training run's directory (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def tokens_path(self) -> Path:
        return self.path / TOKENS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    def stream_path(self, step: int) -> Path:
        """The recorded token stream of one optimizer step (with record_tokens)."""
        return self.path / STREAMS / f"{step_name(step)}.jsonl"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    # ------------------------------------------------------------------ config
    def exists(self) -> bool:
        """Whether a run was started here (its config.json was written)."""
        return self.config_path.is_file()

    def read_config_dict(self) -> dict:
        if not self.config_path.is_file():
            raise RunDirError(f"{self.path} is not a training run directory (no {CONFIG}); "
                              "give the out_dir of a run of `python -m engine.train`")
        try:
            return SETTINGS_BEFORE_THEY_EXISTED | json.loads(self.config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{self.config_path}: unreadable ({e}); the run directory is damaged") from None

    def read_config(self) -> TrainConfig:
        """The run's settings as a TrainConfig (the world size it ran on is dropped)."""
        stored = self.read_config_dict()
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(stored) - known - RECORDED)
        if unknown:
            raise RunDirError(f"{self.config_path}: unknown setting(s) {', '.join(unknown)}: written by another "
                              "version of the engine?")
        return TrainConfig(**{k: v for k, v in stored.items() if k in known})

    @staticmethod
    def config_record(cfg: TrainConfig, world_size: int) -> dict:
        return dataclasses.asdict(cfg) | {"world_size": world_size}

    def check_start(self, cfg: TrainConfig, world_size: int) -> bool:
        """Whether this start resumes a run; raises RunDirError, before anything is loaded, when
        the directory holds a run and `resume` is off, or a run with other settings or data files
        whose content changed (a run started before data files were recorded is not checked)."""
        if not self.exists():
            return False
        if not cfg.resume:
            raise RunDirError(f"{self.path} already holds a run; pass --resume=true to continue it, "
                              "or choose another out_dir")
        stored = self.read_config_dict()
        diff = config_diff(stored, self.config_record(cfg, world_size), ignore=RESUME_MAY_CHANGE | {"data_sha256"})
        if diff:
            raise RunDirError(f"cannot resume {self.path}: the config differs from the run's: " + "; ".join(diff)
                              + " (resume with the run's settings, or choose another out_dir)")
        if "data_sha256" in stored:
            changes = fingerprint_changes(stored["data_sha256"], cfg.data)
            if changes:
                raise RunDirError(f"cannot resume {self.path}: " + "; ".join(changes) + " (restore the run's data, "
                                  "or start a new run in another out_dir)")
        return True

    def write_config(self, cfg: TrainConfig, world_size: int, data_sha256: dict[str, str] | None = None) -> None:
        """Write config.json: the settings, the world size and the data files' `fingerprint`."""
        self.path.mkdir(parents=True, exist_ok=True)
        record = self.config_record(cfg, world_size)
        write_json_atomic(self.config_path, record | {"data_sha256": data_sha256 or fingerprint(cfg.data)})

    # ------------------------------------------------------------------ records
    def read_manifest(self) -> list[dict]:
        """The token manifest (tokens.jsonl): one entry per optimizer step (a partial last line,
        left by an interrupted append, is not an entry)."""
        if not self.tokens_path.is_file():
            raise RunDirError(f"{self.path} has no {TOKENS} (no step finished yet?)")
        return [record for record, _ in read_jsonl_records(self.tokens_path)[0]]

    # ------------------------------------------------------------------ debris of failed writes
    def remove_stale_temporaries(self) -> list[Path]:
        """Remove what interrupted writes left (checkpoints/.tmp-*, .*.tmp* files); returns them."""
        stale = sorted(self.checkpoints.glob(".tmp-*")) if self.checkpoints.is_dir() else []
        for folder in (self.path, self.adapter_dir, self.path / STREAMS):
            if folder.is_dir():
                stale += sorted(p for p in folder.glob(".*.tmp*") if p.is_file())
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return stale

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> tuple[Path | None, list[str]]:
        """The newest intact checkpoint, and the problems of newer ones that were skipped."""
        return checkpoint.latest_valid(self.checkpoints)

    def begin_checkpoint(self, step: int) -> Path:
        """Create (afresh) the hidden directory a checkpoint is written into (one process)."""
        return checkpoint.begin(self.checkpoints, step)

    def pending_checkpoint(self, step: int) -> Path:
        """Where `begin_checkpoint` puts a checkpoint while it is written."""
        return self.checkpoints / f".tmp-{step_name(step)}"

    @staticmethod
    def write_rng(pending: Path, rank: int, state: dict) -> None:
        save_torch(state, pending / f"rng_rank{rank}.pt")

    @staticmethod
    def write_training_state(pending: Path, adapter: dict, optimizer: dict, scheduler: dict) -> None:
        save_safetensors(adapter, pending / ADAPTER_WEIGHTS)
        save_torch({"optimizer": optimizer, "scheduler": scheduler}, pending / TRAINING_STATE)

    @staticmethod
    def commit_checkpoint(pending: Path, meta: dict) -> Path:
        """Hash every file, write the manifest, publish the directory under its final name."""
        return checkpoint.commit(pending, meta)

    @staticmethod
    def read_checkpoint(path: Path, rank: int) -> dict:
        """A checkpoint's contents: manifest, adapter (name -> tensor), optimizer and scheduler
        state, and this rank's RNG state (None when it was saved on another number of ranks)."""
        import torch
        from safetensors.torch import load_file

        manifest = checkpoint.read_manifest(path)
        state = torch.load(path / TRAINING_STATE, weights_only=False)
        rng_file = path / f"rng_rank{rank}.pt"
        return {
            "manifest": manifest,
            "adapter": load_file(str(path / ADAPTER_WEIGHTS)),
            "optimizer": state["optimizer"],
            "scheduler": state["scheduler"],
            "rng": torch.load(rng_file, weights_only=False) if rng_file.is_file() else None,
        }

    # ------------------------------------------------------------------ a finished stage
    @property
    def stage_marker(self) -> Path:
        return self.path / STAGE_COMPLETE

    def stage_complete(self) -> bool:
        """Whether a recipe marked this run a finished stage (and its adapter is there)."""
        return self.stage_marker.is_file() and (self.adapter_dir / "adapter_model.safetensors").is_file()

    def mark_stage_complete(self, info: dict) -> None:
        write_json_atomic(self.stage_marker, info)


class RunRecords:
    """metrics.jsonl, tokens.jsonl and tokens/ of a run directory (written by rank 0 only)."""

    def __init__(self, run: RunDir, enabled: bool, record_tokens: bool):
        self.run, self.enabled, self.record_tokens = run, enabled, record_tokens

    def truncate_after(self, step: int) -> list[str]:
        """Forget what an interrupted run logged after its last checkpoint (steps > `step`),
        including a partial last line an interrupted append left; returns a note for each such
        line. A damaged line elsewhere raises RunDirError naming it."""
        if not self.enabled:
            return []
        notes = []
        for path in (self.run.metrics_path, self.run.tokens_path):
            if path.exists():
                records, torn = read_jsonl_records(path)
                if torn:
                    notes.append(f"{path}: dropped a partial last line (an interrupted write)")
                kept = [line for record, line in records if record["step"] <= step]
                if torn or len(kept) < len(records):
                    _write_text_atomic(path, "".join(line + "\n" for line in kept))
        for path in (self.run.path / STREAMS).glob("step_*.jsonl"):
            if int(path.stem.removeprefix("step_")) > step:
                path.unlink()
        return notes

    def _append(self, path: Path, record: dict) -> None:
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise _named(e, path) from None

    def tokens(self, step: int, epoch: int, samples: list) -> None:
        if not self.enabled:
            return
        self._append(self.run.tokens_path, {
            "step": step, "epoch": epoch,
            "samples": [{"source": s.source, "sha256": sample_hash(s), "tokens": len(s.input_ids),
                         "trained": s.num_targets} for s in samples],
        })
        if self.record_tokens:
            path = self.run.stream_path(step)
            path.parent.mkdir(exist_ok=True)
            try:
                with open(path, "w") as f:
                    f.writelines(s.jsonl_line() + "\n" for s in samples)
            except OSError as e:
                raise _named(e, path) from None

    def metrics(self, record: dict) -> None:
        if self.enabled:
            self._append(self.run.metrics_path, record)
