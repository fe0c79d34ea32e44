"""Write a :class:`CausalLM` as an HF checkpoint (sharded safetensors + config.json).

This is how a merged model (``engine.lora.merge_lora_``) is published so that transformers, vLLM
and :func:`engine.models.from_pretrained` can load it::

    save_pretrained(model, "out/stage1-merged", config="path/to/base_checkpoint", max_shard_size="5GB")

Layout, as transformers' ``save_pretrained``: one ``model.safetensors`` when everything fits in
one shard, else ``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``); shards are filled greedily
in state-dict order and a tensor larger than the limit gets a shard of its own (huggingface_hub's
rule). Every file carries the safetensors metadata ``{"format": "pt"}``. A tied ``lm_head.weight``
is not written (HF re-ties it on load).

Only one shard's tensors are ever held as CPU copies at a time. The directory is written under a
temporary name next to ``out_dir`` and renamed into place at the end, so a crash leaves no
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.errors import SaveError

from .config import ModelArgs
from .decoder import CausalLM
from .loading import INDEX_FILE, SINGLE_FILE

DEFAULT_MAX_SHARD_SIZE = "5GB"

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10**9) / ``"500MiB"`` (2**20), as HF does."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
        if match is None:
            raise SaveError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(match[1]) * _UNITS[match[2]])
    if value <= 0:
        raise SaveError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(specs: Sequence[tuple[str, int]], max_shard_size: int | str) -> list[list[str]]:
    """Group (name, nbytes) pairs into shards, in order (huggingface_hub's greedy rule)."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, nbytes in specs:
        if nbytes > limit:  # too big for any shard: its own shard
            shards.append([name])
            continue
        if current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += nbytes
    if current:
        shards.append(current)
    return shards


def _load_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SaveError(f"config: no such file {path}")
    with path.open() as f:
        return json.load(f)


def _checked_config(model: CausalLM, config: dict[str, Any] | str | Path, dtype: torch.dtype | None) -> dict[str, Any]:
    """The HF config dict, checked to describe ``model``, with its dtype entry set to the saved dtype."""
    cfg = _load_config(config)
    args = ModelArgs.from_hf_config(cfg)
    if args != model.args:
        diff = [
            f"{k}: config {getattr(args, k)!r}, model {getattr(model.args, k)!r}"
            for k in model.args.__dataclass_fields__
            if getattr(args, k) != getattr(model.args, k)
        ]
        raise SaveError("config does not describe this model:\n  " + "\n  ".join(diff))
    if dtype is not None:
        name = _TORCH_DTYPE_NAMES.get(dtype)
        if name is None:
            raise SaveError(f"unsupported save dtype {dtype}")
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        for key in keys:
            cfg[key] = name
    return cfg


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SaveError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise SaveError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary directory to ``out_dir`` (replacing an old one)."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_hf_checkpoint(
    out_dir: str | Path,
    specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    get_tensor: Callable[[str], torch.Tensor],
    config: dict[str, Any],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """Low-level writer: ``specs`` lists (name, shape, dtype) in file order; ``get_tensor(name)``
    returns the full tensor (any device; cast to the spec's dtype here), called exactly once per
    name in ``specs`` order, shard by shard. ``config`` is written verbatim as config.json;
    ``extra_files`` (tokenizer files, generation_config.json, ...) are copied alongside.
    """
    out_dir = Path(out_dir)
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise SaveError("duplicate tensor names in specs")
    sizes = {name: _nbytes(shape, dtype) for name, shape, dtype in specs}
    meta = {name: (tuple(shape), dtype) for name, shape, dtype in specs}
    shards = plan_shards([(n, sizes[n]) for n in names], max_shard_size)
    extra = [Path(p) for p in extra_files]
    for p in extra:
        if not p.is_file():
            raise SaveError(f"extra file {p} does not exist")
        if p.name in ("config.json", SINGLE_FILE, INDEX_FILE) or p.name.startswith("model-"):
            raise SaveError(f"extra file {p} would overwrite a checkpoint file")

    tmp = _prepare_out_dir(out_dir, overwrite)
    try:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            filename = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in shard:
                shape, dtype = meta[name]
                t = get_tensor(name).detach()
                if tuple(t.shape) != shape:
                    raise SaveError(f"tensor {name} has shape {tuple(t.shape)}, spec says {shape}")
                tensors[name] = t.to(device="cpu", dtype=dtype).contiguous()
                weight_map[name] = filename
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            del tensors
            with open(tmp / filename, "rb") as f:
                os.fsync(f.fileno())
        if len(shards) > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
        _write_json(tmp / "config.json", config)
        for p in extra:
            shutil.copyfile(p, tmp / p.name)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def save_pretrained(
    model: CausalLM,
    out_dir: str | Path,
    config: dict[str, Any] | str | Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """Save ``model`` as an HF checkpoint directory loadable by transformers / vLLM / from_pretrained.

    ``config`` is the model's HF config: a dict, a config.json path, or the source checkpoint
    directory (``ModelArgs`` does not keep the original dict). It must describe the model
    (checked via ``ModelArgs.from_hf_config``); its ``torch_dtype``/``dtype`` entry is set to
    the saved dtype. ``dtype`` casts every tensor (default: keep each parameter's dtype, which
    must then be uniform). A model that still carries LoRA adapters is refused: merge them first
    (``engine.lora.merge_lora_``). An existing non-empty ``out_dir`` is only replaced with
    ``overwrite=True``.
    """
    if not isinstance(model, CausalLM):
        raise SaveError(f"save_pretrained needs an engine.models.CausalLM, got {type(model).__name__}")
    state = model.state_dict()  # references, not copies
    adapters = [n for n in state if ".lora." in n]
    if adapters:
        raise SaveError(
            f"model still has {len(adapters)} LoRA adapter tensor(s) (e.g. {adapters[0]}); "
            "call engine.lora.merge_lora_(model) before saving a full checkpoint"
        )
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF does not store the tied head
    for name, t in state.items():
        if t.device.type == "meta":
            raise SaveError(f"tensor {name} is on the meta device")
        if hasattr(t, "device_mesh"):
            raise SaveError(f"tensor {name} is a sharded DTensor; gather it and use write_hf_checkpoint")
    dtypes = {t.dtype for t in state.values()}
    if dtype is None:
        if len(dtypes) != 1:
            raise SaveError(f"model mixes dtypes {sorted(map(str, dtypes))}; pass dtype=...")
        dtype = dtypes.pop()
    cfg = _checked_config(model, config, dtype)
    specs = [(name, tuple(t.shape), dtype) for name, t in state.items()]
    return write_hf_checkpoint(
        out_dir,
        specs,
        state.__getitem__,
        cfg,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        extra_files=extra_files,
    )


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "SaveError", "parse_size", "plan_shards", "save_pretrained", "write_hf_checkpoint"]
