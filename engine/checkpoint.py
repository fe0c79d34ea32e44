"""Atomic checkpoint directories with a manifest that detects truncated or mismatched files.

A checkpoint is written into a hidden temporary directory; `manifest.json` (every file's size and
SHA-256, plus caller metadata) is written last, and only then is the directory renamed to its
final name `step_000123`. A killed process or a full disk therefore leaves either nothing or a
`.tmp-*` directory, never a directory that looks complete; `latest_valid` re-checks sizes and
hashes before trusting one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def begin(root: Path, step: int) -> Path:
    """Create (afresh) the temporary directory a checkpoint is written into."""
    tmp = Path(root) / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, meta: dict) -> Path:
    """Hash every file, write the manifest, and atomically publish the directory."""
    files = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"files": files, **meta}
    try:
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a failed write() names no file
        raise OSError(e.errno, e.strerror or str(e), str(tmp / MANIFEST)) from None
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():  # a stale copy of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(tmp.parent)
    return final


def verify(path: Path) -> list[str]:
    """Problems with a checkpoint directory; empty when it is complete and intact."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return [f"{path}: no {MANIFEST} (incomplete checkpoint)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return [f"{manifest_path}: unreadable ({e})"]
    problems = []
    for name, info in manifest["files"].items():
        f = Path(path) / name
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
        elif sha256_file(f) != info["sha256"]:
            problems.append(f"{f}: content does not match the manifest's SHA-256")
    return problems


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under `root`, and the problems of newer ones that were skipped."""
    skipped: list[str] = []
    candidates = sorted(Path(root).glob("step_*"), reverse=True) if Path(root).is_dir() else []
    for path in candidates:
        problems = verify(path)
        if not problems:
            return path, skipped
        skipped += problems
    return None, skipped
