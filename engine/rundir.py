"""The run directory of a training run: its layout, its records and its checkpoints, in one place.

    out_dir/
      config.json           the resolved `TrainConfig` plus the world size it ran on; a resumption
                            with different settings is refused (`RESUME_MAY_CHANGE` may differ)
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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engine import checkpoint
from engine.config import RESUME_MAY_CHANGE, SETTINGS_BEFORE_THEY_EXISTED, TrainConfig, config_diff
from engine.errors import RunDirError

CONFIG = "config.json"
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


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
        unknown = sorted(set(stored) - known - {"world_size"})
        if unknown:
            raise RunDirError(f"{self.config_path}: unknown setting(s) {', '.join(unknown)}: written by another "
                              "version of the engine?")
        return TrainConfig(**{k: v for k, v in stored.items() if k in known})

    @staticmethod
    def config_record(cfg: TrainConfig, world_size: int) -> dict:
        return dataclasses.asdict(cfg) | {"world_size": world_size}

    def check_start(self, cfg: TrainConfig, world_size: int) -> bool:
        """Whether this start resumes a run; raises RunDirError, before anything is loaded, when
        the directory holds a run and `resume` is off, or a run with other settings."""
        if not self.exists():
            return False
        if not cfg.resume:
            raise RunDirError(f"{self.path} already holds a run; pass --resume=true to continue it, "
                              "or choose another out_dir")
        diff = config_diff(self.read_config_dict(), self.config_record(cfg, world_size), ignore=RESUME_MAY_CHANGE)
        if diff:
            raise RunDirError(f"cannot resume {self.path}: the config differs from the run's: " + "; ".join(diff)
                              + " (resume with the run's settings, or choose another out_dir)")
        return True

    def write_config(self, cfg: TrainConfig, world_size: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, self.config_record(cfg, world_size))

    # ------------------------------------------------------------------ records
    def read_manifest(self) -> list[dict]:
        """The token manifest (tokens.jsonl): one entry per optimizer step."""
        if not self.tokens_path.is_file():
            raise RunDirError(f"{self.path} has no {TOKENS} (no step finished yet?)")
        return [json.loads(line) for line in self.tokens_path.read_text().splitlines()]

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
        import torch

        torch.save(state, pending / f"rng_rank{rank}.pt")

    @staticmethod
    def write_training_state(pending: Path, adapter: dict, optimizer: dict, scheduler: dict) -> None:
        import torch
        from safetensors.torch import save_file

        save_file(adapter, str(pending / ADAPTER_WEIGHTS))
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, pending / TRAINING_STATE)

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

    def truncate_after(self, step: int) -> None:
        """Forget what an interrupted run logged after its last checkpoint (steps > `step`)."""
        if not self.enabled:
            return
        for path in (self.run.metrics_path, self.run.tokens_path):
            if path.exists():
                lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in lines))
        for path in (self.run.path / STREAMS).glob("step_*.jsonl"):
            if int(path.stem.removeprefix("step_")) > step:
                path.unlink()

    def _append(self, path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

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
            with open(path, "w") as f:
                f.writelines(s.jsonl_line() + "\n" for s in samples)

    def metrics(self, record: dict) -> None:
        if self.enabled:
            self._append(self.run.metrics_path, record)
