"""engine.parallel: FSDP2 on 2 CPU ranks (gloo) against single-process references.

One torchrun launch (``tests/dist_worker_parallel.py``) runs every 2-rank scenario and saves
what each rank saw; the tests below compare that with references computed here in one process
from ``engine.models.from_pretrained``. The tiny Qwen2 checkpoint has odd dim-0 sizes (vocab 97,
intermediate 75) and rank-1 adapters (engine.lora's), so shards are uneven and some are empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.parallel as par
from engine.models import CheckpointError, from_pretrained
from engine.models.loading import load_safetensors
from tests.dist_worker_parallel import (
    CLIP_MAX_NORM,
    add_lora,
    build_sharded,
    eval_ids,
    global_trained_tokens,
    is_lora,
    lora_params,
    lora_values,
    loss_sum,
    rank_batch,
    set_lora_values_,
    tiny_config,
)

ATOL = 1e-5
WORKER = Path(__file__).with_name("dist_worker_parallel.py")
REPO = Path(__file__).resolve().parents[1]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _make_checkpoint(path: Path, *, tied: bool) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = {k: v for k, v in tiny_config(tied).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**cfg))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):  # HF inits biases to zero and norms to one; make them matter
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(path, max_shard_size="20KB")  # several shard files + index
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parallel_ckpt")
    return _make_checkpoint(root / "untied", tied=False), _make_checkpoint(root / "tied", tied=True)


@pytest.fixture(scope="module")
def ranks(ckpts, tmp_path_factory) -> list[dict]:
    """Launch the 2-rank gloo worker once; its per-rank results."""
    out = tmp_path_factory.mktemp("parallel_out")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(ckpts[0]), str(ckpts[1]), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"2-rank worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference_model(ckpt: Path, dtype: torch.dtype = torch.float32):
    """Single process, no engine.parallel: from_pretrained + the same adapters and values."""
    model = add_lora(from_pretrained(ckpt, dtype=dtype))
    with torch.no_grad():
        for name, value in lora_values(model).items():
            model.get_parameter(name).copy_(value)
    return model


def reference_grads(ckpt: Path, dtype: torch.dtype = torch.float32) -> tuple:
    """Gradients of the summed loss of both ranks' data, normalised by the global token count."""
    model = reference_model(ckpt, dtype).train()
    n = global_trained_tokens()
    losses = [loss_sum(model, *rank_batch(r)) / n for r in range(2)]
    sum(losses).backward()
    return model, [loss.item() for loss in losses], {name: p.grad.clone() for name, p in lora_params(model)}


# --- 1. sharded load and forward -------------------------------------------------------------


@pytest.mark.distributed
def test_sharded_load_and_forward_match_single_process(ckpts, ranks):
    ref = reference_model(ckpts[0])
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        expected = ref(eval_ids())
    assert expected.std() > 0.5
    for res in ranks:
        assert set(res["param_types"].values()) == {"DTensor"}
        assert set(res["param_types_after_eval"].values()) == {"DTensor"}  # resharded after no_grad forward
        assert res["checkpointed_layers"] == [True, True]
        assert _max_diff(res["logits"], expected) <= ATOL, res["rank"]
        assert torch.equal(res["inv_freq"], ref.model.rotary_emb.inv_freq)
        # The local shard holds exactly this rank's rows of the checkpoint tensor.
        (r0, r1), _ = res["regions"]["model.embed_tokens.weight"]
        assert torch.equal(res["local_embed"], ref_params["model.embed_tokens.weight"][r0:r1])

    # Uneven dim-0 splits with torch.chunk semantics, including empty shards on rank 1.
    shapes = [res["local_shapes"] for res in ranks]
    assert [s["model.embed_tokens.weight"] for s in shapes] == [(49, 32), (48, 32)]
    assert [s["model.layers.0.mlp.gate_proj.weight"] for s in shapes] == [(38, 32), (37, 32)]
    assert [s["model.layers.1.mlp.down_proj.lora.0.A"] for s in shapes] == [(1, 75), (0, 75)]
    for name, global_shape in ranks[0]["global_shapes"].items():
        assert global_shape == tuple(ref_params[name].shape)
        spans = [res["regions"][name][0] for res in ranks]
        assert spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == global_shape[0], name


@pytest.mark.distributed
def test_tied_embeddings_sharded(ckpts, ranks):
    ref = reference_model(ckpts[1])
    with torch.no_grad():
        expected = ref(eval_ids())
    for res in ranks:
        assert res["tied_is_same"]
        assert res["tied_names"] == ["model.embed_tokens.weight"]  # one parameter, one shard
        assert _max_diff(res["tied_logits"], expected) <= ATOL


@pytest.mark.distributed
def test_sharded_load_validation_errors(ranks):
    for res in ranks:
        assert res["missing_error"].startswith("CheckpointError")
        assert "lacks 16 tensor(s)" in res["missing_error"]
        assert "model.layers.0.self_attn.q_proj.lora.0.A" in res["missing_error"]
        assert "lm_head.weight" in res["tied_into_untied_error"]


# --- 2. gradient reduction: SUM over ranks ---------------------------------------------------


@pytest.mark.distributed
def test_gradients_are_summed_over_ranks(ckpts, ranks):
    _, ref_losses, ref_grads = reference_grads(ckpts[0])
    assert len(ref_grads) == 2 * 2 * 4  # A and B of 4 projections in 2 layers
    # A mean over 2 ranks would give half of every gradient: make sure that is detectable.
    for name, g in ref_grads.items():
        assert g.abs().max() > 1e3 * ATOL, name
    for res in ranks:
        assert res["frozen_grads"] == []
        assert set(res["grad_types"].values()) == {"DTensor"}
        assert res["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            assert res["grads"][name].dtype == torch.float32
            assert _max_diff(res["grads"][name], g) <= ATOL, name
    assert [res["loss"] for res in ranks] == pytest.approx(ref_losses, abs=1e-6)


@pytest.mark.distributed
def test_gradient_accumulation_without_sync(ckpts, ranks):
    """set_gradient_sync(False) on the first micro-batch: nothing reduced yet; the last
    backward reduces the accumulated per-rank sums, summed over ranks."""
    model = reference_model(ckpts[0]).train()
    n = global_trained_tokens(micro_batches=2)
    sum(loss_sum(model, *rank_batch(r, k)) / n for r in range(2) for k in range(2)).backward()
    for res in ranks:
        assert res["accum_grads_none_before_sync"] == [True, False]
        for name, p in lora_params(model):
            assert _max_diff(res["accum_grads"][name], p.grad) <= ATOL, name


@pytest.mark.parametrize("key", ["mixed_none", "mixed_bf16"])
@pytest.mark.distributed
def test_mixed_dtype_gradients(ckpts, ranks, key):
    """Frozen bf16 base + trainable fp32 adapters. engine.lora computes the adapters in the
    activation dtype (bf16), whether FSDP gathers them in fp32 (param_dtype None) or already in
    bf16, so both policies compute what the single-process model computes: the relative error
    over all gradients is fp32 summation noise (a mean instead of a sum would be 0.5)."""
    _, _, ref_grads = reference_grads(ckpts[0], torch.bfloat16)
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    for res in ranks:
        dtypes = res[key]["param_dtypes"]
        assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "torch.bfloat16"
        assert dtypes["model.layers.0.self_attn.q_proj.lora.0.A"] == "torch.float32"
        assert {g.dtype for g in res[key]["grads"].values()} == {torch.float32}
        got = torch.cat([res[key]["grads"][name].flatten() for name in ref_grads])
        assert ((got - ref).norm() / ref.norm()).item() <= ATOL, key


# --- 3. copy/gather, clipping, optimizer state -----------------------------------------------


@pytest.mark.distributed
def test_copy_full_gather_full_roundtrip(ranks):
    for res in ranks:
        for name, (full, gathered, local) in res["copy_roundtrip"].items():
            assert torch.equal(gathered, full), name
            (start, stop), *_ = res["regions"][name]
            assert torch.equal(local, full[start:stop]), name
    assert ranks[1]["copy_roundtrip"]["model.layers.1.self_attn.q_proj.lora.0.A"][2].numel() == 0


@pytest.mark.distributed
def test_clip_grad_norm_and_adamw_match_single_process(ckpts, ranks):
    model, _, _ = reference_grads(ckpts[0])
    params = [p for _, p in lora_params(model)]
    ref_norm = torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM).item()
    assert ref_norm > 10 * CLIP_MAX_NORM  # clipping really happened
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    opt.step()
    names = {p: n for n, p in lora_params(model)}
    for res in ranks:
        assert isinstance(res["clip_norm"], float)
        assert res["clip_norm"] == pytest.approx(ref_norm, rel=1e-6)
        for name, p in lora_params(model):
            assert _max_diff(res["clipped_grads"][name], p.grad) <= 1e-8, name
            assert _max_diff(res["params_after_step"][name], p) <= ATOL, name

    state = ranks[0]["optim_state"]
    assert ranks[1]["optim_state"] == {}  # cpu_offload: only rank 0 receives the full state
    assert state["param_groups"][0]["params"] == [names[p] for p in params]
    for p, ref_state in opt.state.items():
        got = state["state"][names[p]]
        assert got["exp_avg"].device.type == "cpu"
        assert got["exp_avg"].shape == p.shape  # full, not a shard
        for key in ("exp_avg", "exp_avg_sq"):
            assert _max_diff(got[key], ref_state[key]) <= 1e-7, (names[p], key)
        assert float(got["step"]) == float(ref_state["step"]) == 1.0
    # Sharded optimizer state: rank 1 holds the remaining rows, or none.
    assert ranks[1]["local_exp_avg_shapes"]["model.layers.0.mlp.gate_proj.lora.0.B"] == (37, 1)
    assert ranks[1]["local_exp_avg_shapes"]["model.layers.0.mlp.gate_proj.lora.0.A"] == (0, 32)


@pytest.mark.distributed
def test_optimizer_state_roundtrip_and_into_one_rank(ckpts, ranks):
    state, again = ranks[0]["optim_state"], ranks[0]["optim_state_roundtrip"]
    # The broadcast turns tuples (AdamW's betas) into lists; values are unchanged.
    untuple = lambda groups: [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]  # noqa: E731
    assert untuple(again["param_groups"]) == untuple(state["param_groups"])
    for name, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(again["state"][name][key], value), (name, key)

    # World-size independent: restore the 2-rank state into a single-process model.
    model = reference_model(ckpts[0])
    with torch.no_grad():
        for name, p in lora_params(model):
            p.copy_(ranks[0]["params_after_step"][name])
    named = dict(lora_params(model))
    opt = torch.optim.AdamW(named.values(), lr=0.5, weight_decay=0.0)  # hyperparameters restored too
    par.set_full_optimizer_state(model, opt, state)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.1
    for name, p in named.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], state["state"][name][key]), (name, key)
    assert par.get_full_optimizer_state(model, opt)["state"].keys() == state["state"].keys()


# --- 4. single process (no process group) ----------------------------------------------------


def test_single_process_path(ckpts, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = par.init_distributed()
    assert (d.rank, d.world_size, d.local_rank, d.is_main) == (0, 1, 0, True)
    assert not par.is_distributed()
    par.barrier()
    t = torch.tensor([2.0, 3.0])
    assert par.all_reduce_sum(t) is t and t.tolist() == [2.0, 3.0]

    # The production build path without a process group equals from_pretrained (+ LoRA).
    model = build_sharded(ckpts[0], base_dtype=torch.float32, param_dtype=torch.bfloat16)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # apply_fsdp: no-op
    assert {p.dtype for n, p in model.named_parameters() if not is_lora(n)} == {torch.float32}
    ref = reference_model(ckpts[0])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(eval_ids()), ref(eval_ids()))
    assert par.local_region(model.lm_head.weight) is None

    # Tied: to_empty unties plain parameters; loading re-ties them.
    tied = build_sharded(ckpts[1], base_dtype=torch.float32, param_dtype=None, adapters=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(tied(eval_ids()), from_pretrained(ckpts[1], dtype=torch.float32)(eval_ids()))

    full = torch.randn(97, 32)
    par.copy_full_(model.lm_head.weight, full)
    assert torch.equal(par.gather_full(model.lm_head.weight), full)
    with pytest.raises(ValueError, match="shape"):
        par.copy_full_(model.lm_head.weight, full[:5])
    sd = par.full_state_dict(lora_params(model))
    assert sd.keys() == dict(lora_params(model)).keys()
    assert all(v.device.type == "cpu" and not v.requires_grad for v in sd.values())

    # Clipping and optimizer state without a process group.
    model.train()
    (loss_sum(model, *rank_batch(0)) / 10).backward()
    params = [p for _, p in lora_params(model)]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, ref_params):
        q.grad = p.grad.clone()
    norm = par.clip_grad_norm_(params, 0.01)
    assert isinstance(norm, float)
    assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(ref_params, 0.01).item(), rel=1e-6)
    assert all(torch.allclose(p.grad, q.grad, rtol=0, atol=1e-9) for p, q in zip(params, ref_params))
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.step()
    state = par.get_full_optimizer_state(model, opt)
    opt2 = torch.optim.AdamW(params, lr=1e-3)
    par.set_full_optimizer_state(model, opt2, state)
    for p in params:
        assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    assert all(p.grad is not None for p in params)  # restoring kept existing gradients


def test_loading_errors_single_process(ckpts, monkeypatch):
    import json

    from engine.models import CausalLM, ModelArgs

    args = ModelArgs.from_hf_config(json.loads((ckpts[0] / "config.json").read_text()))
    with torch.device("meta"):
        model = add_lora(CausalLM(args))
    with pytest.raises(CheckpointError, match="to_empty"):
        load_safetensors(model, ckpts[0], expect_missing=is_lora)
    model.to_empty(device="cpu")
    with pytest.raises(CheckpointError, match="lacks 16 tensor"):
        load_safetensors(model, ckpts[0])
    # A set of names works as well as a predicate.
    lora_names = {n for n, _ in model.named_parameters() if is_lora(n)}
    load_safetensors(model, ckpts[0], expect_missing=lora_names)
    with pytest.raises(CheckpointError, match=r"(?s)lacks 1 tensor.*down_proj.lora.0.A"):
        load_safetensors(model, ckpts[0], expect_missing=set(sorted(lora_names)[1:]))

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="incomplete torchrun environment"):
        par.init_distributed()


# --- 5. activation checkpointing -------------------------------------------------------------


def test_activation_checkpointing_same_loss_and_grads(ckpts):
    """Identical loss and gradients with and without checkpointing, with attention dropout on
    (so the recomputation must replay the same RNG), and the layers really recompute."""
    import json

    from engine.models import CausalLM, ModelArgs

    cfg = json.loads((ckpts[0] / "config.json").read_text())
    args = ModelArgs.from_hf_config({**cfg, "attention_dropout": 0.3})
    results = []
    for checkpointing in (False, True):
        model = CausalLM(args)
        load_safetensors(add_lora(model), ckpts[0], expect_missing=is_lora)
        set_lora_values_(model)
        names_before = list(model.state_dict())
        if checkpointing:
            par.apply_activation_checkpointing(model)
            par.apply_activation_checkpointing(model)  # idempotent
        assert list(model.state_dict()) == names_before  # names unchanged
        calls = []
        # A pre-hook: recomputation stops early, once the last saved activation is recomputed,
        # before the MLP returns (so a forward hook would not see it).
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        model.train()
        torch.manual_seed(11)
        loss = loss_sum(model, *rank_batch(0))
        loss.backward()
        grads = {n: p.grad for n, p in lora_params(model)}
        results.append((loss.item(), grads, len(calls), [par.is_activation_checkpointed(l) for l in model.model.layers]))
    (loss0, grads0, calls0, ac0), (loss1, grads1, calls1, ac1) = results
    assert (calls0, calls1) == (1, 2)  # the checkpointed layer ran again in backward
    assert ac0 == [False, False] and ac1 == [True, True]
    assert loss1 == loss0
    for name in grads0:
        assert torch.allclose(grads1[name], grads0[name], rtol=0, atol=1e-7), name

    # Dropout is live, so equality above depends on replaying the RNG state.
    model = CausalLM(args)
    load_safetensors(add_lora(model), ckpts[0], expect_missing=is_lora)
    set_lora_values_(model)
    model.train()
    torch.manual_seed(12)
    assert abs(loss_sum(model, *rank_batch(0)).item() - loss0) > 1e-3
