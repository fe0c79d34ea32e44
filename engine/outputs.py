"""Where a command writes its results, checked before it does any work.

A command that runs for minutes or hours and then cannot write its result (a typo in the folder,
a file where a folder should be, no permission) must say so at once, in one line, not end in a
traceback after the work. Two kinds of output:

- `check_output_file`: a file written at the end (`engine.audit --output`, `engine.bench --json`
  and `--write`): its folder must exist already — or, for writers that create it
  (`recipes.datasets --out`, `evals.report --json`), be creatable;
- `check_output_dir`: a directory the command creates with its parents (`engine.merge --out`,
  the evals' `--out`, `evals.report --plots`): it must be a directory if it exists, and its
  nearest existing ancestor a writable directory.

Both raise `ConfigError` naming the option and the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import ConfigError


def check_output_file(path: str | os.PathLike, option: str, *, make_folder: bool = False) -> Path:
    """The file `path` can be written: not a directory, in an existing, writable folder (or, with
    `make_folder`, in a folder that can be created)."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ConfigError(f"{option} {target}: is a directory; give a file name")
    if make_folder:
        _creatable(folder, option, target)
    elif not folder.exists():
        raise ConfigError(f"{option} {target}: the folder {folder} does not exist; create it first")
    elif not folder.is_dir():
        raise ConfigError(f"{option} {target}: {folder} is not a folder")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {target}: the folder {folder} is not writable")
    return target


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """The directory `path` exists or can be created (with its parents) and written into."""
    target = Path(path)
    _creatable(target, option, target)
    return target


def _creatable(folder: Path, option: str, shown: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {shown}: {folder} exists and is not a directory")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {shown}: {existing} is a file, so {folder} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {shown}: {existing} is not writable")
