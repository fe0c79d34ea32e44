"""PEFT adapter files (engine.peft_format) both ways against real peft + transformers: our adapters
load with ``peft.PeftModel.from_pretrained`` and give our logits, PEFT's load into ours and give
PEFT's (fp32, eval, <= 1e-5), and adapters we cannot use exactly are refused with one clear error.
"""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import engine.lora as lora
import engine.models as em
from engine.config import PROJECTIONS
from engine.lora import LoraConfig, LoraError
from engine.peft_format import load_peft_adapter, write_peft_adapter

from tests.lora_common import (  # noqa: F401 - fixtures are used by name
    ATOL,
    HIDDEN,
    _COMMON,
    ckpts,
    _hf,
    _ids,
    _max_diff,
    _levels,
    _save,
    _randomise_B,
    _peft_adapter,
    peft_dir,
)


# --------------------------------------------------------------------------------------------
# 1. Our adapter -> PEFT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "seed_oss"])
@pytest.mark.parametrize("rslora", [True, False])
@torch.no_grad()
def test_our_adapter_loads_in_peft(ckpts, tmp_path, arch, rslora):
    ckpt = ckpts[arch]
    ours = em.from_pretrained(ckpt, dtype=torch.float32)
    ids = _ids(2, 13)
    base_logits = ours(ids)
    config = LoraConfig(r=8, alpha=16.0, dropout=0.05, use_rslora=rslora)
    wrapped = lora.apply_lora(ours, config, seed=0)
    assert len(wrapped) == 7 * 2  # seven projections in each of two layers
    _randomise_B(ours, seed=1)
    got = ours(ids)
    assert _max_diff(got, base_logits) > 1e-2, "adapter too small to test anything"

    exported, weights = lora.adapter_state(ours)
    assert exported == LoraConfig(r=8, alpha=16.0, dropout=0.05, use_rslora=rslora,
                                  target_modules=tuple(sorted(config.target_modules)))
    assert sorted(weights) == sorted(wrapped)
    out = write_peft_adapter(tmp_path / "adapter", exported, weights, base_model_name_or_path=str(ckpt))
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").dtype == torch.float32
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * len(wrapped)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["lora_dropout"]) == (8, 16, rslora, 0.05)
    assert sorted(cfg["target_modules"]) == sorted(PROJECTIONS)
    assert cfg["base_model_name_or_path"] == str(ckpt)
    assert not any(p.name.startswith(".") for p in out.iterdir()), "temporary files left behind"

    pm = peft.PeftModel.from_pretrained(_hf(ckpt), out).eval()
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(config.scaling, rel=1e-12)
    assert pm.peft_config["default"].use_rslora is rslora
    expected = pm(ids).logits
    assert _max_diff(got, expected) <= ATOL, (arch, rslora)


def test_export_partial_targets_and_config_weights_mismatch(ckpts, tmp_path):
    """A level that covers only some q_proj layers is exported with full module names; the
    writer refuses a config that does not describe the weights (rank, targets)."""
    ours = em.from_pretrained(ckpts["qwen2"], dtype=torch.float32)
    lora.apply_lora(ours, LoraConfig(r=4, alpha=8.0, target_modules=("layers.1.self_attn.q_proj",)), seed=0)
    config, weights = lora.adapter_state(ours)
    assert config.target_modules == ("model.layers.1.self_attn.q_proj",)
    with pytest.raises(LoraError, match=r"q_proj: A \(4, 64\) and B \(64, 4\) are not of rank r = 8"):
        write_peft_adapter(tmp_path / "x", LoraConfig(r=8, alpha=8.0, target_modules=config.target_modules), weights)
    with pytest.raises(LoraError, match=r"layers.1.self_attn.q_proj is not selected by target_modules \['k_proj'\]"):
        write_peft_adapter(tmp_path / "x", LoraConfig(r=4, alpha=8.0, target_modules=("k_proj",)), weights)
    with pytest.raises(LoraError, match="no weights"):
        write_peft_adapter(tmp_path / "x", config, {})
    assert not (tmp_path / "x").exists()
    out = write_peft_adapter(tmp_path / "a", config, weights, "base")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    pm = peft.PeftModel.from_pretrained(_hf(ckpts["qwen2"]), out)
    assert not hasattr(pm.base_model.model.model.layers[0].self_attn.q_proj, "lora_A")
    assert hasattr(pm.base_model.model.model.layers[1].self_attn.q_proj, "lora_A")


# --------------------------------------------------------------------------------------------
# 2. PEFT adapter -> ours
# --------------------------------------------------------------------------------------------




@pytest.mark.parametrize("arch", ["qwen2", "seed_oss"])
@pytest.mark.parametrize("rslora", [True, False])
@torch.no_grad()
def test_peft_adapter_loads_in_ours(ckpts, tmp_path, arch, rslora):
    ckpt = ckpts[arch]
    pm = _peft_adapter(ckpt, tmp_path / "peft", rslora)
    ids = _ids(2, 11, seed=3)
    expected = pm(ids).logits

    ours = em.from_pretrained(ckpt, dtype=torch.float32)
    base_logits = ours(ids)
    assert _max_diff(expected, base_logits) > 1e-2
    cfg = load_peft_adapter(ours, tmp_path / "peft")
    assert (cfg.r, cfg.alpha, cfg.use_rslora, cfg.dropout) == (8, 16.0, rslora, 0.1)
    assert "gate_proj" not in cfg.target_modules
    assert not isinstance(ours.model.layers[0].mlp.gate_proj, lora.LoraLinear)
    assert lora.trainable_lora_parameters(ours) == []  # trainable=False: loaded frozen
    assert _max_diff(ours(ids), expected) <= ATOL, (arch, rslora)

    # PEFT's in-memory key style (".lora_A.default.weight") is accepted too.
    ours2 = em.from_pretrained(ckpt, dtype=torch.float32)
    in_memory = {k: v.contiguous() for k, v in pm.state_dict().items() if "lora_" in k}
    assert all(".default.weight" in k for k in in_memory)
    alt = tmp_path / "default_keys"
    alt.mkdir()
    shutil.copy(tmp_path / "peft" / "adapter_config.json", alt)
    save_file(in_memory, str(alt / "adapter_model.safetensors"))
    load_peft_adapter(ours2, alt, trainable=True)
    assert len(lora.trainable_lora_parameters(ours2)) == 2 * 6 * 2
    assert _max_diff(ours2(ids), expected) <= ATOL


def test_stage2_on_frozen_peft_stage1(ckpts, peft_dir, tmp_path):
    """The paper's sequence: a stage-1 PEFT adapter loaded frozen, a fresh stage-2 adapter on top."""
    ckpt = ckpts["qwen2"]
    ours = em.from_pretrained(ckpt, dtype=torch.float32)
    ids = _ids(2, 9, seed=8)
    load_peft_adapter(ours, peft_dir)
    with torch.no_grad():
        stage1 = ours(ids)
    lora.apply_lora(ours, LoraConfig(r=4, alpha=8.0), seed=0)
    assert _levels(ours) == [0, 1]
    trainable = {n for n, _ in lora.named_trainable_lora_parameters(ours)}
    assert trainable and all(".lora.1." in n for n in trainable)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        assert _max_diff(ours(ids), stage1) <= ATOL  # stage 2 starts as a no-op (B = 0)
    # Only stage 1 goes out as "the stage-1 adapter"; PEFT's file round-trips exactly.
    again = _save(ours, tmp_path / "again", index=0)
    sd, on_disk = load_file(again / "adapter_model.safetensors"), load_file(peft_dir / "adapter_model.safetensors")
    assert sd.keys() == on_disk.keys() and all(torch.equal(sd[k], on_disk[k]) for k in sd)
    cfg, peft_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (again, peft_dir))
    keys = ("r", "lora_alpha", "lora_dropout", "use_rslora")
    assert [cfg[k] for k in keys] == [peft_cfg[k] for k in keys]
    assert sorted(cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


# --------------------------------------------------------------------------------------------
# 8. Errors
# --------------------------------------------------------------------------------------------




def _variant(peft_dir, tmp_path, config_update=None, drop_keys=(), add=None, name="variant"):
    out = tmp_path / name
    out.mkdir()
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg.update(config_update or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {k: v for k, v in load_file(peft_dir / "adapter_model.safetensors").items() if k not in drop_keys}
    tensors.update(add or {})
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_shape_mismatch_adapter_is_refused(peft_dir):
    args = em.ModelArgs.from_hf_config({**_COMMON, "hidden_size": 32, "architectures": ["Qwen2ForCausalLM"]})
    small = em.CausalLM(args)
    with pytest.raises(LoraError) as err:
        load_peft_adapter(small, peft_dir)
    msg = str(err.value)
    assert msg.startswith(f"cannot load PEFT adapter {peft_dir}:")
    assert "model.layers.0.self_attn.q_proj: A has shape (8, 64), expected (8, 32)" in msg
    assert "model.layers.1.mlp.down_proj: B has shape (64, 8), expected (32, 8)" in msg
    assert "different base model" in msg
    assert _levels(small) == []  # nothing was changed


def test_unknown_target_and_lm_head_refused(ckpts):
    model = em.from_pretrained(ckpts["qwen2"], dtype=torch.float32)
    with pytest.raises(LoraError, match=r"\['qkv_proj'\] match no linear layer.*'q_proj'"):
        lora.apply_lora(model, LoraConfig(target_modules=("q_proj", "qkv_proj")))
    with pytest.raises(LoraError, match="lm_head"):
        lora.apply_lora(model, LoraConfig(target_modules=("q_proj", "lm_head")))
    with pytest.raises(LoraError, match="positive integer"):
        LoraConfig(r=0)
    assert _levels(model) == []
    assert all(p.requires_grad for p in model.parameters())  # a refused apply changes nothing


@pytest.mark.parametrize(
    "update, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias = 'all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights = 'pissa'"),
        ({"target_modules": ["q_proj", "c_attn"]}, r"\['c_attn'\] match no linear layer"),
    ],
)
def test_unsupported_peft_configs_refused(ckpts, peft_dir, tmp_path, update, message):
    model = em.from_pretrained(ckpts["qwen2"], dtype=torch.float32)
    with pytest.raises(LoraError, match=message) as err:
        load_peft_adapter(model, _variant(peft_dir, tmp_path, config_update=update))
    assert str(tmp_path / "variant") in str(err.value)  # the message names the adapter
    assert _levels(model) == []


def test_bad_tensors_refused(ckpts, peft_dir, tmp_path):
    """Problems of the file itself (a lone lora_B, foreign tensors), then problems of fitting the
    model (targeted modules without values, values for modules not targeted or absent): each
    kind listed together, nothing changed."""
    model = em.from_pretrained(ckpts["qwen2"], dtype=torch.float32)
    prefix = "base_model.model.model."
    gone = f"{prefix}layers.1.mlp.up_proj.lora_A.weight"
    foreign = {f"{prefix}norm.weight": torch.ones(HIDDEN)}
    bad_file = _variant(peft_dir, tmp_path, drop_keys=(gone,), add=foreign, name="bad_file")
    with pytest.raises(LoraError) as err:
        load_peft_adapter(model, bad_file)
    msg = str(err.value)
    assert msg.startswith(f"{bad_file / 'adapter_model.safetensors'}:")
    assert f"1 tensor(s) missing (each module needs lora_A and lora_B):\n  {gone}" in msg
    assert f"{prefix}norm.weight (not a lora_A/lora_B weight)" in msg

    pair = lambda module: {f"{prefix}{module}.lora_A.weight": torch.zeros(8, HIDDEN),  # noqa: E731
                           f"{prefix}{module}.lora_B.weight": torch.zeros(HIDDEN, 8)}
    dropped = tuple(f"{prefix}layers.1.mlp.up_proj.lora_{ab}.weight" for ab in "AB")
    misfit = _variant(peft_dir, tmp_path, drop_keys=dropped, add=pair("layers.0.mlp.gate_proj") | pair("layers.5.mlp.up_proj"),
                      name="misfit")
    with pytest.raises(LoraError) as err:
        load_peft_adapter(model, misfit)
    msg = str(err.value)
    assert msg.startswith(f"cannot load PEFT adapter {misfit}:")
    assert "no values for 1 module(s) that target_modules select:\n  model.layers.1.mlp.up_proj" in msg
    assert "model.layers.0.mlp.gate_proj (not selected by target_modules)" in msg
    assert "model.layers.5.mlp.up_proj (no such linear layer in the model)" in msg
    assert _levels(model) == []


def test_meta_model_load_with_values_out(ckpts, peft_dir):
    """The trainer's stack_adapters path: a PEFT adapter added to a meta-device model, its values
    copied in after materialising and loading the base: the same model as loading it directly."""
    ckpt = ckpts["qwen2"]
    direct = em.from_pretrained(ckpt, dtype=torch.float32)
    load_peft_adapter(direct, peft_dir)
    with torch.device("meta"):
        model = em.CausalLM(direct.args)
    with pytest.raises(LoraError, match="meta device; materialise it first"):
        load_peft_adapter(model, peft_dir)
    values = {}
    load_peft_adapter(model, peft_dir, values_out=values)
    assert model.model.layers[0].self_attn.q_proj.lora["0"].A.is_meta
    model.to_empty(device="cpu")
    model.init_buffers()
    with safe_open(ckpt / "model.safetensors", "pt") as f, torch.no_grad():
        params = dict(model.named_parameters())
        assert {n for n in params if lora.is_lora_parameter_name(n)} == values.keys()
        for name in f.keys():
            params[name].copy_(f.get_tensor(name))
        for name, value in values.items():
            assert value.dtype == torch.float32
            params[name].copy_(value)
    model.eval()
    ids = _ids(2, 7)
    with torch.no_grad():
        assert torch.equal(model(ids), direct(ids))
