"""Shared pieces of the LoRA tests (tests/test_lora.py, tests/test_peft_format.py): tiny HF
checkpoints, PEFT-made adapters, and small helpers."""

from __future__ import annotations


import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import engine.lora as lora
from engine.peft_format import write_peft_adapter
from tests.tiny import HF_COMMON, HF_VOCAB, hf_checkpoints

ATOL = 1e-5
VOCAB = HF_VOCAB
HIDDEN = HF_COMMON["hidden_size"]
_COMMON = HF_COMMON


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return hf_checkpoints(tmp_path_factory)


def _hf(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _levels(model):
    """The model's adapter stack levels, from its parameter names (``...lora.<level>.A``)."""
    return sorted({int(n.rsplit(".", 2)[1]) for n, _ in model.named_parameters() if lora.is_lora_parameter_name(n)})


def _save(model, out, base=None, index=-1):
    """What the trainer writes: one adapter level in PEFT's format."""
    return write_peft_adapter(out, *lora.adapter_state(model, index), base_model_name_or_path=base)


@torch.no_grad()
def _copy_init_values(model, seed):
    """The sharded path's init (engine.parallel): lora_init_values copied into the parameters."""
    for name, value in lora.lora_init_values(model, seed).items():
        model.get_parameter(name).copy_(value)


@torch.no_grad()
def _randomise_B(model, seed, std=0.05, level=None):
    """B is zero at init, which would make every parity check trivial."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if lora.is_lora_parameter_name(name) and name.endswith(".B"):
            if level is None or f".lora.{level}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _peft_adapter(ckpt, out, rslora, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")):
    torch.manual_seed(5)
    pm = peft.get_peft_model(
        _hf(ckpt),
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, use_rslora=rslora, target_modules=list(targets)),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.eval()
    pm.save_pretrained(out)
    return pm


@pytest.fixture(scope="module")
def peft_dir(ckpts, tmp_path_factory):
    path = tmp_path_factory.mktemp("peft_adapter")
    _peft_adapter(ckpts["qwen2"], path, rslora=True)
    return path
