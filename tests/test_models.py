"""Parity of engine.models with transformers' Qwen2ForCausalLM / SeedOssForCausalLM, and loader errors.

Tiny random HF models are saved with ``save_pretrained`` and loaded with
``engine.models.from_pretrained``; logits must match HF's to 1e-5 in fp32 (eval mode) on a plain
batch, on positions far from 0, and on a packed varlen row compared with each sample run
through HF alone.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from transformers import Qwen2Config, Qwen2ForCausalLM, SeedOssConfig, SeedOssForCausalLM

import engine.models as em

ATOL = 1e-5
VOCAB = 256

# Small enough for 2 CPU cores; initializer_range is raised from HF's 0.02 so that logits and
# attention patterns are far from uniform and every weight visibly matters.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
)

CASES = {
    # Qwen2.5-32B shape family: GQA, q/k/v bias, untied head, rope_theta 1e6.
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_COMMON, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
    ),
    # Small Qwen2.5 models tie the head to the embeddings; also multi-query (1 KV head).
    "qwen2_tied": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_COMMON, num_key_value_heads=1, rope_theta=1e4, tie_word_embeddings=True)
    ),
    # Seed-OSS: explicit head_dim != hidden/heads (64/4 = 16), o_proj bias, nonzero dropouts
    # (inactive in eval mode); saved sharded to exercise the index path.
    "seed_oss": lambda: SeedOssForCausalLM(
        SeedOssConfig(
            **_COMMON,
            num_key_value_heads=2,
            head_dim=24,
            rope_theta=1e7,
            attention_bias=True,
            attention_out_bias=True,
            attention_dropout=0.1,
            residual_dropout=0.1,
        )
    ),
    # Seed-OSS without o_proj bias, with MLP bias, head_dim 32.
    "seed_oss_no_out_bias": lambda: SeedOssForCausalLM(
        SeedOssConfig(
            **_COMMON,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=1e7,
            attention_out_bias=False,
            mlp_bias=True,
        )
    ),
}
SHARDED = {"seed_oss"}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(case name, HF model in eval mode, our model loaded from its save_pretrained directory)."""
    name = request.param
    torch.manual_seed(0)
    hf = CASES[name]()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith(".bias"):  # HF inits biases to zero; make them matter
                p.normal_(0.0, 0.5)
            elif "norm" in pname:  # and norms to one
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    hf.eval()
    ckpt = tmp_path_factory.mktemp(name)
    hf.save_pretrained(ckpt, max_shard_size="40KB" if name in SHARDED else "50GB")
    if name in SHARDED:
        assert (ckpt / "model.safetensors.index.json").is_file()
        assert len(list(ckpt.glob("model-*.safetensors"))) > 1
    else:
        assert (ckpt / "model.safetensors").is_file()
    ours = em.from_pretrained(ckpt, dtype=torch.float32)
    return name, hf, ours, ckpt


def _ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_batch_parity(pair):
    name, hf, ours, _ = pair
    assert not ours.training  # from_pretrained returns eval mode, as HF
    ids = _ids(3, 17)
    expected = hf(ids).logits
    got = ours(ids)
    assert got.shape == (3, 17, VOCAB)
    assert expected.std() > 0.5, "random model too close to uniform to test anything"
    assert _max_diff(got, expected) <= ATOL, name


@torch.no_grad()
def test_far_positions_parity(pair):
    """Positions far from 0 (as in a late turn of a long conversation), different per row."""
    name, hf, ours, _ = pair
    ids = _ids(2, 40, seed=2)
    position_ids = torch.arange(40).expand(2, 40) + torch.tensor([[20_000], [31_000]])
    expected = hf(ids, position_ids=position_ids).logits
    got = ours(ids, position_ids=position_ids)
    assert _max_diff(got, expected) <= ATOL, name
    # RoPE must actually matter, or the check above proves nothing about it.
    assert _max_diff(got, ours(ids)) > 1e-3


@torch.no_grad()
def test_packed_varlen_parity(pair):
    """A packed row equals running each sample alone through HF: no attention across samples,
    positions restart at 0."""
    name, hf, ours, _ = pair
    lengths = [5, 11, 1, 7]
    samples = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(samples, dim=1)  # (1, 24)
    cu_seqlens = torch.tensor([0, 5, 16, 17, 24], dtype=torch.int32)
    expected = torch.cat([hf(s).logits for s in samples], dim=1)

    position_ids = em.position_ids_from_cu_seqlens(cu_seqlens)
    got = ours(packed, position_ids=position_ids, cu_seqlens=cu_seqlens)
    assert _max_diff(got, expected) <= ATOL, name
    # position_ids default to restarting per sample when cu_seqlens is given.
    assert torch.equal(ours(packed, cu_seqlens=cu_seqlens), got)
    # Without cu_seqlens the samples would see each other: the packing is really what matters.
    assert _max_diff(ours(packed, position_ids=position_ids), expected) > 1e-3


@torch.no_grad()
def test_return_hidden(pair):
    _, hf, ours, _ = pair
    ids = _ids(2, 9, seed=3)
    hidden = ours(ids, return_hidden=True)
    assert hidden.shape == (2, 9, 64)
    assert _max_diff(hidden, hf.model(ids).last_hidden_state) <= ATOL
    assert torch.allclose(F.linear(hidden, ours.lm_head.weight), ours(ids), atol=0, rtol=0)


def test_state_dict_names_match_hf(pair):
    name, hf, ours, _ = pair
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours_shapes == hf_shapes, name
    # Projections are plain nn.Linear, so a LoRA wrapper can replace them by module name.
    assert type(ours.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear


def test_tied_embeddings(pair):
    name, _, ours, ckpt = pair
    if name != "qwen2_tied":
        assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
        return
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # absent lm_head is fine when tied
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


@torch.no_grad()
def test_bf16_load(pair):
    name, _, ours32, ckpt = pair
    ours = em.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    # RoPE frequencies stay fp32 whatever the parameter dtype.
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(ours.model.rotary_emb.inv_freq, ours32.model.rotary_emb.inv_freq)
    ref = ours32.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(ours.model.embed_tokens.weight, ref)
    ids = _ids(1, 12, seed=4)
    logits = ours(ids)
    assert logits.dtype == torch.bfloat16
    assert _max_diff(logits.float(), ours32(ids)) < 0.25 * ours32(ids).abs().max().item()


# --- dropout ------------------------------------------------------------------------------


def _tiny_seed_oss_config(**overrides):
    cfg = SeedOssConfig(**_COMMON, num_key_value_heads=2, head_dim=24, **overrides).to_dict()
    cfg["architectures"] = ["SeedOssForCausalLM"]
    return cfg


@pytest.mark.parametrize(("attention_dropout", "residual_dropout"), [(0.3, 0.0), (0.0, 0.3), (0.0, 0.0)])
@torch.no_grad()
def test_seed_oss_dropout_only_in_training(attention_dropout, residual_dropout):
    args = em.ModelArgs.from_hf_config(
        _tiny_seed_oss_config(attention_dropout=attention_dropout, residual_dropout=residual_dropout)
    )
    assert (args.attention_dropout, args.residual_dropout) == (attention_dropout, residual_dropout)
    torch.manual_seed(0)
    model = em.CausalLM(args)
    model.init_weights()
    ids = _ids(2, 16, seed=5)

    model.eval()
    eval_logits = model(ids)
    assert torch.equal(model(ids), eval_logits)

    # Residual dropout zeroes elements of both branch outputs (o_proj and down_proj), as in HF's
    # SeedOssAttention / SeedOssMLP; attention dropout acts inside attention and zeroes none.
    branch_outputs = {}
    layer = model.model.layers[1]
    for branch in ("self_attn", "mlp"):
        getattr(layer, branch).register_forward_hook(
            lambda module, inputs, out, branch=branch: branch_outputs.__setitem__(branch, out)
        )

    model.train()
    first, second = model(ids), model(ids)
    assert set(branch_outputs) == {"self_attn", "mlp"}
    for branch, out in branch_outputs.items():
        zero_fraction = (out == 0).float().mean().item()
        assert abs(zero_fraction - residual_dropout) < 0.1, branch
    if attention_dropout or residual_dropout:
        assert _max_diff(first, second) > 1e-3
        assert _max_diff(first, eval_logits) > 1e-3
    else:
        assert torch.allclose(first, eval_logits, atol=ATOL, rtol=0)


def test_qwen2_has_no_residual_dropout():
    cfg = Qwen2Config(**_COMMON, num_key_value_heads=2).to_dict()
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    args = em.ModelArgs.from_hf_config(cfg)
    assert args.residual_dropout == 0.0 and args.attention_dropout == 0.0
    assert (args.attention_bias, args.attention_out_bias, args.mlp_bias) == (True, False, False)


# --- attention and positions --------------------------------------------------------------


def test_position_ids_from_cu_seqlens():
    got = em.position_ids_from_cu_seqlens(torch.tensor([0, 3, 5, 5, 9]))
    assert got.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_varlen_attention_is_block_diagonal_causal():
    """attention(cu_seqlens) against one SDPA call with an explicit block-diagonal causal mask."""
    g = torch.Generator().manual_seed(0)
    total, n_heads, n_kv, d = 13, 6, 2, 8
    q = torch.randn(1, total, n_heads, d, generator=g)
    k = torch.randn(1, total, n_kv, d, generator=g)
    v = torch.randn(1, total, n_kv, d, generator=g)
    cu_seqlens = torch.tensor([0, 4, 4, 10, 13])
    got = em.attention(q, k, v, cu_seqlens=cu_seqlens)

    sample = torch.repeat_interleave(torch.arange(4), cu_seqlens[1:] - cu_seqlens[:-1])
    pos = torch.arange(total)
    mask = (sample[:, None] == sample[None, :]) & (pos[:, None] >= pos[None, :])
    rep = n_heads // n_kv
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(rep, dim=2).transpose(1, 2),
        v.repeat_interleave(rep, dim=2).transpose(1, 2),
        attn_mask=mask,
    ).transpose(1, 2)
    assert got.shape == (1, total, n_heads, d)
    assert _max_diff(got, expected) <= 1e-6


def test_varlen_attention_rejects_bad_cu_seqlens():
    q = k = v = torch.zeros(1, 6, 2, 4)
    with pytest.raises(ValueError, match="row length 6"):
        em.attention(q, k, v, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="batch 1"):
        em.attention(q.expand(2, -1, -1, -1), k, v, cu_seqlens=torch.tensor([0, 6]))


# --- init and config ---------------------------------------------------------------------


def test_init_weights_after_meta_build():
    args = em.ModelArgs.from_hf_config(_tiny_seed_oss_config(tie_word_embeddings=True))
    with torch.device("meta"):
        model = em.CausalLM(args)
    model.to_empty(device="cpu")
    model.tie_weights()
    torch.manual_seed(0)
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    q = model.model.layers[0].self_attn.q_proj
    assert abs(q.weight.std().item() - args.initializer_range) < 0.02
    assert torch.count_nonzero(q.bias) == 0
    assert torch.all(model.model.norm.weight == 1)
    assert torch.all(model.model.embed_tokens.weight[args.pad_token_id] == 0)
    expected_inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, 24, 2, dtype=torch.float32) / 24))
    assert torch.equal(model.model.rotary_emb.inv_freq, expected_inv_freq)
    assert torch.isfinite(model(_ids(1, 8))).all()


from engine.models.presets import QWEN25_32B_CONFIG, SEED_OSS_36B_CONFIG  # noqa: E402


@pytest.mark.parametrize(
    ("config", "hf_cls", "expected"),
    [
        (QWEN25_32B_CONFIG, Qwen2ForCausalLM, dict(head_dim=128, rope_theta=1e6, attention_out_bias=False)),
        (
            SEED_OSS_36B_CONFIG,
            SeedOssForCausalLM,
            dict(head_dim=128, rope_theta=1e7, attention_out_bias=False, residual_dropout=0.1),
        ),
    ],
    ids=["qwen2.5-32b", "seed-oss-36b"],
)
def test_full_size_configs_match_hf_structure(config, hf_cls, expected):
    """The real 32B/36B configs parse, and the meta-device model has HF's exact names and shapes."""
    args = em.ModelArgs.from_hf_config(config)
    assert {k: getattr(args, k) for k in expected} == expected
    with torch.device("meta"):
        ours = em.CausalLM(args)
        hf = hf_cls(hf_cls.config_class.from_dict(config))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert hf.model.rotary_emb.inv_freq.shape == ours.model.rotary_emb.inv_freq.shape


def test_unknown_architecture_is_rejected():
    with pytest.raises(em.ConfigError, match="LlamaForCausalLM") as err:
        em.ModelArgs.from_hf_config({**QWEN25_32B_CONFIG, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert "Qwen2ForCausalLM" in str(err.value) and "SeedOssForCausalLM" in str(err.value)
    with pytest.raises(em.ConfigError, match="model_type 'llama'"):
        em.ModelArgs.from_hf_config({**QWEN25_32B_CONFIG, "model_type": "llama"})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"use_sliding_window": True}, "sliding"),
        ({"layer_types": ["sliding_attention"] * 64}, "full_attention"),
        ({"hidden_act": "gelu"}, "silu"),
    ],
)
def test_unsupported_features_raise(overrides, match):
    with pytest.raises(NotImplementedError, match=match):
        em.ModelArgs.from_hf_config({**QWEN25_32B_CONFIG, **overrides})


def test_transformers5_rope_parameters_layout():
    cfg = {k: v for k, v in QWEN25_32B_CONFIG.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert em.ModelArgs.from_hf_config(cfg).rope_theta == 5e5


# --- checkpoint errors -------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory):
    """(config.json dict, state dict) of a tiny untied Qwen2 checkpoint, to corrupt per test."""
    torch.manual_seed(0)
    hf = CASES["qwen2"]()
    ckpt = tmp_path_factory.mktemp("qwen2_errors")
    hf.save_pretrained(ckpt)
    return json.loads((ckpt / "config.json").read_text()), load_file(ckpt / "model.safetensors")


def _write(tmp_path, config, state_dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_missing_tensor(tmp_path, qwen2_checkpoint):
    config, sd = qwen2_checkpoint
    sd = dict(sd)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(em.CheckpointError, match=r"lacks 1 tensor.*\n  model\.layers\.1\.mlp\.up_proj\.weight"):
        em.from_pretrained(_write(tmp_path, config, sd), dtype=torch.float32)


def test_misshaped_tensor(tmp_path, qwen2_checkpoint):
    config, sd = qwen2_checkpoint
    sd = {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(5, 64)}
    with pytest.raises(em.CheckpointError) as err:
        em.from_pretrained(_write(tmp_path, config, sd), dtype=torch.float32)
    assert (
        "tensor 'model.layers.0.self_attn.k_proj.weight' in model.safetensors has shape (5, 64), expected (32, 64)"
        in str(err.value)
    )


def test_unexpected_tensor(tmp_path, qwen2_checkpoint):
    config, sd = qwen2_checkpoint
    sd = {**sd, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}
    with pytest.raises(em.CheckpointError, match=r"does not define:\n  model\.layers\.0\.self_attn\.extra\.weight"):
        em.from_pretrained(_write(tmp_path, config, sd), dtype=torch.float32)


def test_non_float_tensor(tmp_path, qwen2_checkpoint):
    config, sd = qwen2_checkpoint
    name = "model.layers.2.self_attn.q_proj.weight"
    sd = {**sd, name: sd[name].to(torch.int8)}
    with pytest.raises(em.CheckpointError, match=rf"tensor '{name}' in model.safetensors has dtype I8"):
        em.from_pretrained(_write(tmp_path, config, sd), dtype=torch.float32)


def test_tied_checkpoint_with_stored_head(tmp_path, qwen2_checkpoint):
    """With tied embeddings a stored lm_head.weight is ignored (as HF does): the embedding wins."""
    config, sd = qwen2_checkpoint
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    model = em.from_pretrained(_write(tmp_path, {**config, "tie_word_embeddings": True}, sd), dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, sd["model.embed_tokens.weight"])


def test_unknown_architecture_checkpoint(tmp_path, qwen2_checkpoint):
    config, sd = qwen2_checkpoint
    config = {**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    with pytest.raises(em.ConfigError, match="MistralForCausalLM.*supported: Qwen2ForCausalLM"):
        em.from_pretrained(_write(tmp_path, config, sd))


def test_missing_files(tmp_path, qwen2_checkpoint):
    config, sd = qwen2_checkpoint
    with pytest.raises(em.CheckpointError, match="no config.json"):
        em.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(sd, tmp_path / "consolidated.safetensors")
    with pytest.raises(em.CheckpointError, match="no model.safetensors.*consolidated.safetensors"):
        em.from_pretrained(tmp_path)
    with pytest.raises(em.CheckpointError, match="not found"):
        em.from_pretrained(tmp_path / "nope")


def test_index_names_missing_shard(tmp_path, qwen2_checkpoint):
    config, sd = qwen2_checkpoint
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    first = "model-00001-of-00002.safetensors"
    save_file({n: sd[n] for n in shards[first]}, tmp_path / first)
    with pytest.raises(em.CheckpointError, match="shard file.*model-00002-of-00002.safetensors"):
        em.from_pretrained(tmp_path)
