"""How a training run meets faults: a diverging step, a failed write, a rank that stops answering.

The trainer (`engine.train`) calls these; each fault ends the run on every rank with one
`EngineError` that names the step, the file or the rank, and the last good checkpoint:

* a step whose loss or gradient norm is not finite is refused before the update; one whose update
  leaves a non-finite value in the adapter or its optimizer state is refused before it is logged or
  saved (`nonfinite_values`, counted on every rank and summed: `per_rank`);
* a write that fails (a full disk) becomes a `WriteError` naming the file (`write_error`);
* under torchrun, a failure on one rank is agreed on by all (`per_rank`), so no rank waits for a
  collective the failed one will never join; a collective that times out anyway (a hung rank)
  becomes a `TrainingError` naming the ranks that did not answer (`timeout_error`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from engine import parallel
from engine.errors import TrainingError, WriteError


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # this rank's shard of a DTensor


def nonfinite_values(named: Iterable[tuple[str, torch.Tensor]], device) -> tuple[int, str | None]:
    """How many of the floating-point tensors hold an inf or nan on this rank (in their local
    shards), and the name of the first. Two small kernels per tensor and one synchronisation."""
    named = [(name, _local(t)) for name, t in named if t.is_floating_point()]
    named = [(name, t) for name, t in named if t.numel()]
    if not named:
        return 0, None
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
    count = int((~finite).sum().item())
    first = named[int((~finite).nonzero()[0, 0])][0] if count else None
    return count, first


def nonfinite_after_update(named_params: Iterable[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                           dist: parallel.Dist) -> str | None:
    """What an optimizer step left non-finite, over every rank ("in 1 parameter tensor(s), on rank(s)
    0, e.g. ..."), or None. Each rank checks its shards of the adapter and of the optimizer state;
    a collective under torchrun (every rank learns the totals, so all stop together)."""
    named = list(named_params)
    state = [(f"{name} ({key})", t) for name, p in named
             for key, t in optimizer.state.get(p, {}).items() if isinstance(t, torch.Tensor)]
    params, first_param = nonfinite_values(named, dist.device)
    states, first_state = nonfinite_values(state, dist.device)
    table = per_rank([params, states], dist) if dist.world_size > 1 else [[params, states]]
    if not any(any(row) for row in table):
        return None
    totals = [sum(row[i] for row in table) for i in (0, 1)]
    found = [f"in {int(n)} {what} tensor(s)" for n, what in zip(totals, ("parameter", "optimizer state")) if n]
    ranks = ", ".join(str(r) for r, row in enumerate(table) if any(row))
    first = first_param or first_state
    return ", ".join(found) + f", on rank(s) {ranks}" + (f", e.g. {first}" if first else "")


def per_rank(values: list[float], dist: parallel.Dist) -> list[list[float]]:
    """Every rank's `values` (the same number on each), indexed by rank: a collective under torchrun."""
    table = torch.zeros((dist.world_size, len(values)), dtype=torch.float64)
    table[dist.rank] = torch.tensor(values, dtype=torch.float64)
    return parallel.all_reduce_sum(table).tolist()


def failed_ranks(failed: bool, dist: parallel.Dist) -> list[int]:
    """The ranks on which something failed (a collective: every rank learns of every failure)."""
    if dist.world_size == 1:
        return [0] if failed else []
    return [r for r, (f,) in enumerate(per_rank([float(failed)], dist)) if f]


def write_error(error: BaseException, path: str | os.PathLike, where: str, last_good: str) -> WriteError:
    """A failed write as one line: the file (the OSError's own, else `path`), where in the run,
    the reason (the OS's words), and what to do."""
    filename = getattr(error, "filename", None) or path
    reason = getattr(error, "strerror", None) or str(error)
    if getattr(error, "errno", None) is not None:
        reason = f"[Errno {error.errno}] {reason}"
    return WriteError(f"cannot write {filename} {where}: {reason}; {last_good}; make room (or fix the "
                      "permissions), then continue the run with --resume=true")


# ---------------------------------------------------------------- collectives that time out

_TIMEOUT_WORDS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out or lost its peer (gloo raises RuntimeError;
    NCCL's watchdog ends the process itself, with a message naming the rank)."""
    if not parallel.is_distributed() or not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistError) or any(w in text for w in _TIMEOUT_WORDS)


def silent_ranks(rank: int, world: int, grace_s: float) -> list[int] | None:
    """After a timeout: the ranks that did not time out too within `grace_s` (hung or dead), found
    through the rendezvous store every rank still reaches; None when there is no such store."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set(f"engine/timed_out/{rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in range(world) if r != rank and not store.check([f"engine/timed_out/{r}"])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 -- only a diagnosis: the store may be gone too
        return None


def timeout_error(error: RuntimeError, dist: parallel.Dist, where: str, timeout_min: float,
                  last_good: str) -> TrainingError:
    """A collective that failed on this rank as one line naming the rank(s) that did not answer.
    The process group is unusable afterwards: `process_group_broken` tells the entry point to exit
    without tearing it down (which can block or abort)."""
    seconds = timeout_min * 60
    text = str(error).strip()
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = f"timed out after {round(seconds)} s" if seconds < 120 else f"timed out after {timeout_min:g} min"
        what += f" (collective_timeout_min = {timeout_min:g})"
    else:
        what = f"failed ({text.splitlines()[0][:200] if text else type(error).__name__})"
    silent = silent_ranks(dist.rank, dist.world_size, grace_s=min(30.0, max(2.0, seconds / 5)))
    if silent is None:
        who = "another rank did not answer (hung or dead: see the other ranks' messages)"
    elif silent:
        ranks = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
        who = f"{ranks} did not answer (hung or dead: see its messages)"
    else:
        who = "every rank timed out (waiting in different collectives: a bug; see the messages above)"
    out = TrainingError(f"a collective operation {where} {what}: {who}; {last_good}; once every rank works, "
                        "continue the run with --resume=true")
    out.process_group_broken = True
    return out


def describe_where(step: int) -> str:
    return f"at step {step}" if step else "before the first step"


def remove_tree(path: Path) -> None:
    """Remove a directory a failed write left, ignoring errors (it is debris: the next start retries)."""
    shutil.rmtree(path, ignore_errors=True)
