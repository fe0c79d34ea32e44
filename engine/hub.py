"""Where a model checkpoint lives: a local directory, or a Hugging Face hub repo id to fetch.

Torch-free (pathlib and huggingface_hub, imported only to fetch), so that the token audit and
other light tools resolve checkpoints without loading the model code.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import CheckpointError


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    # Anything that looks like a filesystem path is a local checkpoint that is not there; only a
    # bare "org/name" goes to the hub.
    if path.exists() or path.is_absolute() or text.startswith((".", "~")):
        raise CheckpointError(f"checkpoint directory not found (or not a directory): {text}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo, bad id: all reported alike
        raise CheckpointError(f"{text}: not a local directory, and fetching it from the Hugging Face hub failed "
                              f"({type(e).__name__}: {e}); give the path of a downloaded checkpoint") from None
