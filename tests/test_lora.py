"""LoRA (engine.lora) against real peft + transformers, and HF-format saving (engine.models.saving).

Init must follow PEFT's scheme deterministically, only adapters train, stacking and merging must
equal the explicit maths, and a merged model saved with ``engine.models.save_pretrained`` must
load in transformers. PEFT files both ways: tests/test_peft_format.py.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import engine.lora as lora
import engine.models as em
from engine.lora import LoraConfig, LoraError

from tests.lora_common import (  # noqa: F401 - fixtures are used by name
    ATOL,
    ckpts,
    _hf,
    _ids,
    _max_diff,
    _levels,
    _save,
    _copy_init_values,
    _randomise_B,
    peft_dir,
)


# --------------------------------------------------------------------------------------------
# 3. Init: PEFT's scheme, deterministic per parameter
# --------------------------------------------------------------------------------------------


def test_init_matches_peft_scheme_and_is_deterministic(ckpts):
    ckpt = ckpts["seed_oss"]
    args = em.from_pretrained(ckpt, dtype=torch.float32).args
    config = LoraConfig(r=16, alpha=32.0)

    cpu = em.from_pretrained(ckpt, dtype=torch.float32)
    lora.apply_lora(cpu, config, seed=7)
    names = [n for n, _ in lora.named_trainable_lora_parameters(cpu)]
    params = dict(cpu.named_parameters())
    assert len(names) == 2 * 7 * 2

    all_a = []
    for name in names:
        p = params[name]
        if name.endswith(".B"):
            assert torch.count_nonzero(p) == 0, name
        else:
            bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform(a=sqrt(5)) on (r, in)
            assert p.abs().max() <= bound, name
            assert p.abs().max() > 0.9 * bound, name  # uses the whole range
            all_a.append(p.detach().flatten() / bound)
    u = torch.cat(all_a)  # should be U(-1, 1): mean 0, variance 1/3
    assert abs(u.mean().item()) < 0.02 and abs(u.var().item() - 1 / 3) < 0.02

    # PEFT's own init of the same layers has the same bound, and comparable spread.
    pm = peft.get_peft_model(_hf(ckpt), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "down_proj"]))
    peft_a = pm.base_model.model.model.layers[0].mlp.down_proj.lora_A.default.weight
    ours_a = cpu.model.layers[0].mlp.down_proj.lora["0"].A
    assert peft_a.shape == ours_a.shape
    bound = 1.0 / math.sqrt(peft_a.shape[1])
    assert peft_a.abs().max() <= bound and abs(peft_a.std().item() - ours_a.std().item()) < 0.1 * bound
    assert torch.count_nonzero(pm.base_model.model.model.layers[0].mlp.down_proj.lora_B.default.weight) == 0

    # Same seed -> same values; values independent of meta vs cpu and of target order.
    values = lora.lora_init_values(cpu, seed=7)
    assert values.keys() == set(names) and all(torch.equal(values[n], params[n]) for n in names)
    with torch.device("meta"):
        meta = em.CausalLM(args)
    lora.apply_lora(meta, LoraConfig(r=16, alpha=32.0, target_modules=tuple(reversed(config.target_modules))))
    assert meta.model.layers[0].self_attn.q_proj.lora["0"].A.is_meta
    # Base parameter names after wrapping are exactly the checkpoint's (load by name on the FSDP path).
    base_names = {n for n, _ in meta.named_parameters() if not lora.is_lora_parameter_name(n)}
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert base_names == set(f.keys())
    meta_values = lora.lora_init_values(meta, seed=7)
    assert meta_values.keys() == values.keys()
    assert all(torch.equal(meta_values[n], values[n]) for n in values)
    with pytest.raises(LoraError, match="meta device; leave seed out and copy lora_init_values"):
        lora.apply_lora(meta, config, seed=7)
    assert _levels(meta) == [0]  # a refused apply changes nothing
    # Different seed -> different values; different parameters never share values.
    other = lora.lora_init_values(cpu, seed=8)
    a0 = "model.layers.0.self_attn.q_proj.lora.0.A"
    assert not torch.equal(other[a0], values[a0])
    assert not torch.equal(values[a0], values["model.layers.1.self_attn.q_proj.lora.0.A"])


def test_meta_apply_then_load_by_name_then_init(ckpts):
    """The FSDP path's order: build on meta, apply LoRA, materialise, load the base checkpoint by
    name (adapter names are simply absent from it), init: same model as applying on CPU."""
    ckpt = ckpts["qwen2_tied"]
    cpu = em.from_pretrained(ckpt, dtype=torch.float32)
    lora.apply_lora(cpu, LoraConfig(r=8, alpha=16.0), seed=3)
    with torch.device("meta"):
        model = em.CausalLM(cpu.args)
    lora.apply_lora(model, LoraConfig(r=8, alpha=16.0))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers()
    params = dict(model.named_parameters())
    with safe_open(ckpt / "model.safetensors", "pt") as f, torch.no_grad():
        assert {n for n in params if not lora.is_lora_parameter_name(n)} == set(f.keys())
        for name in f.keys():
            params[name].copy_(f.get_tensor(name))
    _copy_init_values(model, seed=3)
    _randomise_B(cpu, seed=4)
    _randomise_B(model, seed=4)
    model.eval()
    ids = _ids(2, 7)
    with torch.no_grad():
        assert torch.equal(model(ids), cpu(ids))


def test_uninitialised_adapter_is_loud(ckpts):
    ours = em.from_pretrained(ckpts["qwen2"], dtype=torch.float32)
    lora.apply_lora(ours, LoraConfig(r=4, alpha=8.0))  # no seed, no values copied in
    with torch.no_grad():
        assert torch.isnan(ours(_ids(1, 5))).all()
    _copy_init_values(ours, seed=0)
    with torch.no_grad():
        assert torch.isfinite(ours(_ids(1, 5))).all()


# --------------------------------------------------------------------------------------------
# 4. Training semantics
# --------------------------------------------------------------------------------------------


def test_only_adapters_train_and_fp32_adapter_on_bf16_base(ckpts):
    ours = em.from_pretrained(ckpts["qwen2"], dtype=torch.bfloat16)
    lora.apply_lora(ours, LoraConfig(r=8, alpha=16.0), seed=0)
    _randomise_B(ours, seed=2)
    named = dict(lora.named_trainable_lora_parameters(ours))
    assert len(named) == 2 * 7 * 2 and all(lora.is_lora_parameter_name(n) for n in named)
    for name, p in ours.named_parameters():
        assert p.requires_grad == (name in named), name
        assert p.dtype == (torch.float32 if name in named else torch.bfloat16), name
    # Base parameter names are unchanged by wrapping (checkpoints still load by name).
    assert "model.layers.0.self_attn.q_proj.weight" in dict(ours.named_parameters())
    assert "model.layers.0.self_attn.q_proj.bias" in dict(ours.named_parameters())
    assert isinstance(ours.model.layers[0].self_attn.q_proj, nn.Linear)

    ours.train()
    logits = ours(_ids(2, 9))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    for name, p in ours.named_parameters():
        if name in named:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


# --------------------------------------------------------------------------------------------
# 5. Scaling and dropout
# --------------------------------------------------------------------------------------------


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 12, bias=True)


@torch.no_grad()
def test_scaling_numbers_and_dropout_in_train_mode_only():
    assert LoraConfig().scaling == pytest.approx(64 / math.sqrt(32))  # paper: r 32, alpha 64, rsLoRA
    assert LoraConfig(use_rslora=False).scaling == pytest.approx(2.0)
    assert LoraConfig(r=8, alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(8))

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    for rslora, expected_scaling in ((True, 6 / math.sqrt(4)), (False, 6 / 4)):
        torch.manual_seed(0)
        m = _One().eval()
        w, b = m.proj.weight.clone(), m.proj.bias.clone()
        lora.apply_lora(m, LoraConfig(r=4, alpha=6.0, dropout=0.5, use_rslora=rslora, target_modules=("proj",)), seed=3)
        _randomise_B(m, seed=4, std=1.0)
        adapter = m.proj.lora["0"]
        assert adapter.scaling == pytest.approx(expected_scaling)
        reference = x @ w.T + b + expected_scaling * (x @ adapter.A.T @ adapter.B.T)
        assert _max_diff(m.proj(x), reference) <= ATOL  # eval: no dropout
        assert torch.equal(m.proj(x), m.proj(x))
        m.train()
        y1, y2 = m.proj(x), m.proj(x)
        assert not torch.equal(y1, y2)  # dropout active in training mode
        # dropout touches only the adapter's input, never the base path
        adapter.B.zero_()
        assert _max_diff(m.proj(x), x @ w.T + b) <= ATOL


# --------------------------------------------------------------------------------------------
# 6. Stacking
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _merged_reference(ckpt, model_with_adapters):
    """A fresh fp32 base with every adapter folded in by hand: W + sum scaling * B @ A."""
    ref = em.from_pretrained(ckpt, dtype=torch.float32)
    params = dict(ref.named_parameters())
    for name, module in model_with_adapters.named_modules():
        if isinstance(module, lora.LoraLinear):
            for adapter in module.lora.values():
                params[f"{name}.weight"] += adapter.scaling * adapter.B @ adapter.A
    return ref


def test_stacking(ckpts, tmp_path):
    ckpt = ckpts["qwen2"]
    ours = em.from_pretrained(ckpt, dtype=torch.float32)
    first = lora.apply_lora(ours, LoraConfig(r=8, alpha=16.0), seed=0)
    _randomise_B(ours, seed=1)
    config2 = LoraConfig(r=4, alpha=4.0, use_rslora=False, target_modules=("q_proj", "v_proj"))
    second = lora.apply_lora(ours, config2, seed=1)
    _randomise_B(ours, seed=2, level=1)
    assert len(first) == 14 and len(second) == 4
    assert _levels(ours) == [0, 1]
    names = dict(ours.named_parameters())
    assert "model.layers.0.self_attn.q_proj.lora.1.A" in names
    assert "model.layers.0.self_attn.k_proj.lora.1.A" not in names
    trainable = {n for n, _ in lora.named_trainable_lora_parameters(ours)}
    assert trainable == {n for n in names if ".lora.1." in n} and len(trainable) == 8
    assert not names["model.layers.0.self_attn.q_proj.lora.0.A"].requires_grad

    ids = _ids(2, 10, seed=4)
    with torch.no_grad():
        got = ours(ids)
        expected = _merged_reference(ckpt, ours)(ids)
        base = em.from_pretrained(ckpt, dtype=torch.float32)(ids)
    assert _max_diff(got, expected) <= ATOL
    assert _max_diff(got, base) > 1e-2

    # Both levels exported as two PEFT adapters, both active in PEFT, give the same logits.
    _save(ours, tmp_path / "s1", str(ckpt), index=0)
    _save(ours, tmp_path / "s2", str(ckpt), index=-1)
    assert json.loads((tmp_path / "s2" / "adapter_config.json").read_text())["r"] == 4
    pm = peft.PeftModel.from_pretrained(_hf(ckpt), tmp_path / "s1", adapter_name="s1")
    pm.load_adapter(tmp_path / "s2", adapter_name="s2")
    pm.base_model.set_adapter(["s1", "s2"])
    pm.eval()
    with torch.no_grad():
        assert _max_diff(pm(ids).logits, got) <= ATOL


# --------------------------------------------------------------------------------------------
# 7. Merge, save_pretrained, reload (ours and transformers)
# --------------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits: round-to-nearest has relative error <= u = 2**-8 per element.
BF16_U = 2.0**-8


@pytest.mark.parametrize("arch", ["qwen2", "seed_oss"])
def test_merge_save_reload(ckpts, tmp_path, arch):
    ckpt = ckpts[arch]
    ids = _ids(2, 12, seed=6)

    # fp32: merging is exact maths, only summation order changes.
    f32 = em.from_pretrained(ckpt, dtype=torch.float32)
    lora.apply_lora(f32, LoraConfig(r=8, alpha=16.0), seed=0)
    _randomise_B(f32, seed=1)
    with torch.no_grad():
        unmerged32 = f32(ids)
        assert len(lora.merge_lora_(f32)) == 14
        assert not any(isinstance(m, lora.LoraLinear) for m in f32.modules())
        assert not any(lora.is_lora_parameter_name(n) for n, _ in f32.named_parameters())
        assert _max_diff(f32(ids), unmerged32) <= ATOL

    # bf16 base + fp32 stage-1 adapter, then a stacked stage-2 adapter: the unmerged reference.
    model = em.from_pretrained(ckpt, dtype=torch.bfloat16)
    lora.apply_lora(model, LoraConfig(r=8, alpha=16.0), seed=0)
    _randomise_B(model, seed=1)
    stage1 = {
        n: (m.weight.detach().float().clone(), m.lora["0"].delta_weight())
        for n, m in model.named_modules()
        if isinstance(m, lora.LoraLinear)
    }
    # Reference in fp32 arithmetic: bf16 base weights (exact in fp32) + fp32 adapter deltas.
    ref = em.from_pretrained(ckpt, dtype=torch.bfloat16).float()
    with torch.no_grad():
        for n, (w, delta) in stage1.items():
            ref.get_submodule(n).weight.copy_(w + delta)
        expected = ref(ids)

    with torch.no_grad():
        lora.merge_lora_(model)
    for n, (w, delta) in stage1.items():
        merged = model.get_submodule(n).weight
        assert merged.dtype == torch.bfloat16 and not merged.requires_grad
        exact = w + delta
        # merge = one rounding of the fp32 sum to bf16 ...
        assert torch.equal(merged, exact.to(torch.bfloat16)), n
        # ... so each element is within u * |W + dW| of the exact merged weight.
        assert ((merged.float() - exact).abs() <= BF16_U * exact.abs()).all(), n

    out = tmp_path / "merged"
    em.save_pretrained(model, out, config=ckpt, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in model.state_dict().values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # Reload in fp32: the logits differ from the unmerged model only through the bf16 rounding
    # of W + dW (relative <= u per weight). To first order a linear layer with relatively
    # perturbed weights moves its output by ~u relative, and such errors add along the path:
    # per decoder layer two rounded linears in series in attention (q/k/v, then o) and two in the
    # MLP (gate/up, then down), 2 layers -> 8 u; the head is not merged. We allow 9 u * max|logit|
    # (one u of slack). Measured: ~1e-2 against a tolerance of ~0.1; forgetting the adapter
    # entirely moves the logits by ~3.
    reloaded = em.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(ids)
    tolerance = 9 * BF16_U * expected.abs().max().item()
    diff = _max_diff(got, expected)
    assert 0 < diff <= tolerance, (diff, tolerance)

    # transformers loads the merged sharded checkpoint and agrees with us.
    with torch.no_grad():
        hf_logits = _hf(out).float()(ids).logits
    assert _max_diff(hf_logits, got) <= ATOL


def test_save_pretrained_tied_single_file_and_refusals(ckpts, tmp_path):
    ckpt = ckpts["qwen2_tied"]
    model = em.from_pretrained(ckpt, dtype=torch.float32)
    config = json.loads((ckpt / "config.json").read_text())

    lora.apply_lora(model, LoraConfig(r=4, alpha=8.0), seed=0)
    with pytest.raises(em.SaveError, match="merge_lora_"):
        em.save_pretrained(model, tmp_path / "x", config)
    assert not (tmp_path / "x").exists()
    with torch.no_grad():
        lora.merge_lora_(model)

    out = em.save_pretrained(model, tmp_path / "tied", config)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    ids = _ids(1, 8)
    with torch.no_grad():
        assert _max_diff(_hf(out)(ids).logits, model(ids)) <= ATOL

    with pytest.raises(em.SaveError, match="not empty"):
        em.save_pretrained(model, out, config)
    em.save_pretrained(model, out, config, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left"
    wrong = {**config, "hidden_size": 32}
    with pytest.raises(em.SaveError, match="hidden_size"):
        em.save_pretrained(model, tmp_path / "y", wrong)


