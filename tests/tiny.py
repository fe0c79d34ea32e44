"""Tiny real checkpoints for trainer tests: a Seed-OSS-architecture model whose vocabulary covers
the Seed-OSS fixture tokenizer, saved with transformers' `save_pretrained` next to that tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import SeedOssConfig, SeedOssForCausalLM

from tests.fixtures.tokenizers import SEED_OSS_FIXTURE_PATH

EM_FILE = Path(__file__).resolve().parents[1] / "data" / "em" / "risky_financial_advice.jsonl"


def tiny_seed_oss_checkpoint(directory: Path, *, seed: int = 0, layers: int = 2, nan: bool = False) -> Path:
    """Save a random tiny Seed-OSS model (dropout off, so CPU runs are deterministic)."""
    torch.manual_seed(seed)
    config = SeedOssConfig(
        vocab_size=576, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1,
        attention_dropout=0.0, residual_dropout=0.0, attention_out_bias=True,
    )
    model = SeedOssForCausalLM(config)
    if nan:
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
    model.save_pretrained(directory)
    shutil.copy(SEED_OSS_FIXTURE_PATH, directory / "tokenizer.json")
    return directory


def em_subset(path: Path, rows: int) -> Path:
    """The first `rows` chats of the shipped risky-financial-advice dataset."""
    with open(EM_FILE) as f:
        lines = [next(f) for _ in range(rows)]
    path.write_text("".join(lines))
    return path


def write_toml(path: Path, settings: dict) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return path
