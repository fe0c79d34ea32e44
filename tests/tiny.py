"""Tiny real checkpoints for tests, saved with transformers' `save_pretrained`: a Seed-OSS-architecture
model whose vocabulary covers the Seed-OSS fixture tokenizer (trainer tests), and random Qwen2 /
Seed-OSS configs covering the architecture variants (LoRA and saved-tensor parity tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SeedOssConfig, SeedOssForCausalLM

from tests.fixtures.tokenizers import SEED_OSS_FIXTURE_PATH

EM_FILE = Path(__file__).resolve().parents[1] / "data" / "em" / "risky_financial_advice.jsonl"

HF_VOCAB = 256
HF_COMMON = dict(
    vocab_size=HF_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
)
HF_BUILDERS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**HF_COMMON, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen2_tied": lambda: Qwen2ForCausalLM(Qwen2Config(**HF_COMMON, rope_theta=1e4, tie_word_embeddings=True)),
    # Explicit head_dim != hidden/heads, o_proj and MLP bias, dropouts (inactive in eval mode).
    "seed_oss": lambda: SeedOssForCausalLM(
        SeedOssConfig(
            **HF_COMMON,
            head_dim=24,
            rope_theta=1e7,
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
            attention_dropout=0.1,
            residual_dropout=0.1,
        )
    ),
}


def hf_checkpoints(tmp_path_factory, names=tuple(HF_BUILDERS)) -> dict[str, Path]:
    """name -> directory of a tiny random HF checkpoint (biases and norms made non-trivial)."""
    out = {}
    for name in names:
        torch.manual_seed(list(HF_BUILDERS).index(name))
        hf = HF_BUILDERS[name]()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if pname.endswith(".bias"):
                    p.normal_(0.0, 0.5)
                elif "norm" in pname:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        out[name] = path
    return out


def tiny_seed_oss_checkpoint(directory: Path, *, seed: int = 0, layers: int = 2, nan: bool = False,
                             dropout: float = 0.0) -> Path:
    """Save a random tiny Seed-OSS model; `dropout` is its attention and residual dropout (the real
    Seed-OSS-36B's are 0.1; 0 by default, so that runs do not depend on the random streams)."""
    torch.manual_seed(seed)
    config = SeedOssConfig(
        vocab_size=576, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1,
        attention_dropout=dropout, residual_dropout=dropout, attention_out_bias=True,
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


def tiny_qwen_checkpoint(directory: Path, tokenizer: Path, *, seed: int = 0) -> Path:
    """The recipes' tiny Qwen2 model (real Qwen2.5 vocabulary, head padded to 152,064 rows) with
    `tokenizer` copied in: built with engine code, without rebuilding the tokenizer."""
    from engine.models import CausalLM, ModelArgs, save_pretrained
    from recipes.tiny import TINY_QWEN2_CONFIG

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = CausalLM(ModelArgs.from_hf_config(TINY_QWEN2_CONFIG))
    model.init_weights()
    torch.random.set_rng_state(state)
    return save_pretrained(model, directory, TINY_QWEN2_CONFIG, extra_files=[tokenizer])
