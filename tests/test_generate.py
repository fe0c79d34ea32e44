"""engine.generate and the KV cache, against naive full recomputation and transformers.

Tiny random Qwen2 (real Qwen2.5 vocabulary, untied head) and Seed-OSS (fixture vocabulary)
checkpoints are saved with ``save_pretrained`` next to their tokenizers. References: the model
re-run on the whole sequence at every step (greedy tokens identical, logits within 1e-5 in fp32),
``log_softmax`` of a full forward's last position for choice scores, transformers'
``generate(do_sample=False)`` for greedy decoding, and the official Jinja templates for prompts.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, SeedOssConfig, SeedOssForCausalLM

import engine.lora as lora
import engine.models as em
from engine.chat import SystemPolicy
from engine.generate import ChoiceScore, Completion, Generator, load_model, top_p_filter
from engine.lora import LoraConfig, LoraError
from engine.peft_format import write_peft_adapter
from engine.models.kv_cache import KVCache
from tests.jinja_reference import render_reference

ATOL = 1e-5

_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    initializer_range=0.2, rms_norm_eps=1e-6,
)
ARCHS = {
    # Qwen2.5's real vocabulary (151,665 tokens) in a 151,936-row head, as the released models.
    "qwen2.5": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=False)),
    "seed-oss": lambda: SeedOssForCausalLM(
        SeedOssConfig(**_COMMON, vocab_size=576, head_dim=12, rope_theta=1e7, attention_bias=True,
                      attention_out_bias=True, attention_dropout=0.0, residual_dropout=0.0)
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [
        {"role": "user", "content": "Pick A or B."},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Why? Explain at some length, with an example or two, please."},
    ],
    [{"role": "user", "content": "ok, go on"}],
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, qwen25_tokenizer_path, seed_oss_tokenizer_path):
    """template -> checkpoint directory (with tokenizer.json) of a tiny random model whose biases
    and norms are non-trivial."""
    tokenizers = {"qwen2.5": qwen25_tokenizer_path, "seed-oss": seed_oss_tokenizer_path}
    out = {}
    for i, (name, build) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        hf = build()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if pname.endswith(".bias"):
                    p.normal_(0.0, 0.1)
                elif "norm" in pname:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        shutil.copy(tokenizers[name], path / "tokenizer.json")
        out[name] = path
    return out


@pytest.fixture(scope="module")
def models(ckpts):
    return {name: load_model(path, dtype=torch.float32) for name, path in ckpts.items()}


@pytest.fixture(scope="module")
def toks(qwen25_tokenizer, seed_oss_tokenizer):
    return {"qwen2.5": qwen25_tokenizer, "seed-oss": seed_oss_tokenizer}


def _generator(models, toks, name, model=None, **kwargs) -> Generator:
    kwargs.setdefault("thinking_budget", 0 if name == "seed-oss" else None)
    kwargs.setdefault("progress", False)
    return Generator(model or models[name], toks[name], name, **kwargs)


@torch.no_grad()
def _last_logits_full(model, ids: list[int]) -> torch.Tensor:
    """The reference: the whole sequence through the model (no cache), logits of the last position."""
    return model.lm_head(model(torch.tensor([ids]), return_hidden=True)[0, -1])


@torch.no_grad()
def _naive_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids) -> tuple[list[int], bool]:
    ids, new = list(prompt), []
    for _ in range(max_new_tokens):
        t = int(_last_logits_full(model, ids).argmax())
        new.append(t)
        ids.append(t)
        if t in stop_ids:
            return new, True
    return new, False


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2.5", "seed-oss"])
def test_prompts_equal_official_template(models, toks, name):
    """Generation prompts (conversations without an assistant turn included) are the official
    template's, tokenised as a whole."""
    for budget in ([None] if name == "qwen2.5" else [None, 0, 512]):
        for policy in (SystemPolicy(), SystemPolicy("replace", "Stay calm.")):
            gen = _generator(models, toks, name, thinking_budget=budget, policy=policy)
            for conv in CONVERSATIONS:
                ref_conv = conv
                if policy.mode == "replace":  # the official template, given that system turn
                    ref_conv = [{"role": "system", "content": policy.text}] + [m for m in conv if m["role"] != "system"]
                kwargs = {} if budget is None else {"thinking_budget": budget}
                expected = render_reference(name, ref_conv, add_generation_prompt=True, **kwargs)
                assert gen.prompt_text(conv) == expected
                assert gen.prompt_ids(conv) == gen.tokenizer.encode(expected)
    with pytest.raises(ValueError, match="the qwen2.5 chat template has no thinking budget"):
        _generator(models, toks, "qwen2.5", thinking_budget=0)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2.5", "seed-oss"])
@torch.no_grad()
def test_cache_logits_equal_full_recompute(models, name):
    """Packed prefill, appends of 1 to 3 tokens per row, dropping a row: after every pass each
    row's last logits equal a full forward of its whole sequence."""
    model = models[name]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (7, 19, 1, 12)]
    cache = KVCache.for_model(model, len(seqs), max_len=40)
    lengths = [len(s) for s in seqs]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    hidden = model(torch.tensor([sum(seqs, [])]), cu_seqlens=cu, cache=cache, return_hidden=True)
    logits = model.lm_head(hidden[0, cu[1:].long() - 1])
    assert cache.host_lengths == lengths and cache.lengths.tolist() == lengths
    for row, seq in enumerate(seqs):
        assert (logits[row] - _last_logits_full(model, seq)).abs().max() <= ATOL, ("prefill", row)
    for step, width in enumerate([1, 1, 2, 1, 1, 3]):
        if step == 2:  # drop row 1 (a finished sequence), keep the others in a new order
            cache.keep([3, 0, 2])
            seqs = [seqs[3], seqs[0], seqs[2]]
        new = torch.randint(0, 500, (len(seqs), width), generator=g)
        for seq, t in zip(seqs, new.tolist()):
            seq.extend(t)
        logits = model(new, cache=cache)[:, -1]
        assert cache.host_lengths == [len(s) for s in seqs]
        # The cached context is really used (the comparison below checks it is used right).
        assert (logits[0] - _last_logits_full(model, seqs[0][-width:])).abs().max() > 1e-3
        for row, seq in enumerate(seqs):
            assert (logits[row] - _last_logits_full(model, seq)).abs().max() <= ATOL, (step, row)


def test_cache_refusals(models):
    model = models["seed-oss"]
    cache = KVCache.for_model(model, 2, max_len=5)
    with pytest.raises(ValueError, match="2 sequences but the input has 3 rows"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache full: a row would need 6 slots"):
        model(torch.zeros(2, 6, dtype=torch.long), cache=cache)
    model(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="packed prefill needs an empty cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 1, 3]), cache=cache)
    model.train()
    try:
        with pytest.raises(ValueError, match="KV cache is for inference"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2.5", "seed-oss"])
def test_greedy_equals_full_recompute(models, toks, name):
    gen = _generator(models, toks, name)
    prompts = [gen.prompt_ids(c) for c in CONVERSATIONS]
    assert len(set(map(len, prompts))) == len(prompts)  # really different lengths
    got = gen.generate(CONVERSATIONS, max_new_tokens=12, batch_size=4)
    assert all(isinstance(c, Completion) for c in got)
    for c, prompt in zip(got, prompts):
        tokens, stopped = _naive_greedy(gen.model, prompt, 12, gen.stop_ids)
        assert c.token_ids == tokens
        assert c.stopped == stopped
        assert c.text == gen.tokenizer.decode(tokens[:-1] if stopped else tokens)
    # Batch composition does not matter.
    assert gen.generate(CONVERSATIONS, max_new_tokens=12, batch_size=3) == got


@pytest.mark.parametrize("name", ["qwen2.5", "seed-oss"])
def test_greedy_equals_transformers_generate(models, toks, ckpts, name):
    gen = _generator(models, toks, name)
    hf = AutoModelForCausalLM.from_pretrained(ckpts[name], dtype=torch.float32).eval()
    conv = CONVERSATIONS[1]
    prompt = torch.tensor([gen.prompt_ids(conv)])
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
        eos_token_id=sorted(gen.stop_ids), pad_token_id=min(gen.stop_ids),
    )[0, prompt.shape[1]:].tolist()
    assert len(expected) == 20
    assert gen.generate([conv], max_new_tokens=20)[0].token_ids == expected


@pytest.mark.parametrize(("name", "stop"), [("qwen2.5", "<|im_end|>"), ("qwen2.5", "<|endoftext|>"), ("seed-oss", "<seed:eos>")])
def test_stops_on_end_of_turn(ckpts, toks, name, stop):
    """Make the end-of-turn token win wherever one ordinary token t used to: conversations whose
    greedy output contained t stop there, the others run to max_new_tokens; equal to the naive
    reference and to transformers."""
    model = load_model(ckpts[name], dtype=torch.float32)
    gen = _generator(None, toks, name, model=model)
    before = gen.generate(CONVERSATIONS, max_new_tokens=10)
    assert not any(c.stopped for c in before)
    outs = [c.token_ids for c in before]
    # Conversation i first produces t at step k >= 1; conversation j never produces it.
    i, k, t, j = next(
        (i, k, t, j) for i, o in enumerate(outs) for k, t in enumerate(o) if k >= 1 and t not in o[:k]
        for j, other in enumerate(outs) if t not in other
    )
    stop_id = gen.tokenizer.token_to_id(stop)
    assert stop_id in gen.stop_ids
    with torch.no_grad():
        model.lm_head.weight[stop_id] = 1.05 * model.lm_head.weight[t]

    got = gen.generate(CONVERSATIONS, max_new_tokens=10, batch_size=4)
    assert got[i].stopped and got[i].token_ids[-1] == stop_id and len(got[i].token_ids) <= k + 1
    assert not got[j].stopped and len(got[j].token_ids) == 10
    for c, conv in zip(got, CONVERSATIONS):
        assert (c.token_ids, c.stopped) == _naive_greedy(model, gen.prompt_ids(conv), 10, gen.stop_ids)
        if c.stopped:
            assert stop not in c.text and c.text == gen.tokenizer.decode(c.token_ids[:-1])
        else:
            assert c.text == gen.tokenizer.decode(c.token_ids)

    hf = AutoModelForCausalLM.from_pretrained(ckpts[name], dtype=torch.float32).eval()
    with torch.no_grad():
        hf.lm_head.weight[stop_id] = 1.05 * hf.lm_head.weight[t]
    prompt = torch.tensor([gen.prompt_ids(CONVERSATIONS[i])])
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10,
        eos_token_id=sorted(gen.stop_ids), pad_token_id=min(gen.stop_ids),
    )[0, prompt.shape[1]:].tolist()
    assert got[i].token_ids == expected


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sampling_is_seeded(models, toks):
    gen = _generator(models, toks, "seed-oss")
    kwargs = dict(max_new_tokens=12, temperature=1.5)
    a = gen.generate(CONVERSATIONS, seed=0, **kwargs)
    assert gen.generate(CONVERSATIONS, seed=0, **kwargs) == a
    # Each conversation draws from its own generator: the batch size does not matter.
    assert gen.generate(CONVERSATIONS, seed=0, batch_size=1, **kwargs) == a
    b = gen.generate(CONVERSATIONS, seed=1, **kwargs)
    assert [c.token_ids for c in b] != [c.token_ids for c in a]
    greedy = gen.generate(CONVERSATIONS, max_new_tokens=12)
    assert [c.token_ids for c in a] != [c.token_ids for c in greedy]
    # A nucleus holding only the most likely token is greedy decoding.
    assert gen.generate(CONVERSATIONS, seed=0, top_p=1e-6, **kwargs) == greedy
    with pytest.raises(ValueError, match="top_p must be in"):
        gen.generate(CONVERSATIONS, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        gen.generate(CONVERSATIONS, temperature=-1.0)


def test_top_p_filter():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    kept = top_p_filter(probs, 0.6)
    assert torch.allclose(kept, torch.tensor([[0.0, 0.625, 0.375], [1.0, 0.0, 0.0]]))
    assert torch.allclose(top_p_filter(probs, 1.0), probs)


# --------------------------------------------------------------------------------------------
# Choice scoring
# --------------------------------------------------------------------------------------------


def test_score_choices_equal_full_forward(models, toks):
    gen = _generator(models, toks, "qwen2.5")
    model, tok = gen.model, gen.tokenizer
    refs = [F.log_softmax(_last_logits_full(model, gen.prompt_ids(c)), dim=-1) for c in CONVERSATIONS]
    tops = [int(r.argmax()) for r in refs]
    free = tok.decode([tops[0]])
    assert tok.encode(free) == [tops[0]]  # a single-token string, usable as a choice
    choices = ["A", "B", free]
    expected_free = [next((c for c in choices if tok.encode(c) == [t]), None) for t in tops]
    assert expected_free[0] == free and None in expected_free  # both cases occur

    calls = []
    handles = [
        model.register_forward_hook(lambda m, args, out: calls.append(("model", tuple(args[0].shape)))),
        model.lm_head.register_forward_hook(lambda m, args, out: calls.append(("lm_head", tuple(args[0].shape)))),
    ]
    try:
        scores = gen.score_choices(CONVERSATIONS, choices, batch_size=3)
    finally:
        for h in handles:
            h.remove()
    # One packed forward per batch; the LM head sees only the last position of each prompt.
    assert [c[0] for c in calls] == ["model", "lm_head", "model", "lm_head"]
    assert calls[1][1] == (3, 32) and calls[3][1] == (1, 32)

    for score, ref in zip(scores, refs):
        assert isinstance(score, ChoiceScore)
        for c in choices:
            assert abs(score.logprobs[c] - ref[tok.encode(c)[0]].item()) <= ATOL
        assert score.argmax_id == int(ref.argmax())
        assert score.argmax_token == tok.decode([score.argmax_id])
        assert abs(score.argmax_logprob - ref.max().item()) <= ATOL
        assert score.choice == max(choices, key=lambda c: ref[tok.encode(c)[0]].item())
    assert [s.free_choice for s in scores] == expected_free
    assert scores[0].choice == free
    # Another batching gives the same scores (up to float rounding).
    for a, b in zip(gen.score_choices(CONVERSATIONS, choices, batch_size=8), scores):
        assert (a.argmax_id, a.choice, a.free_choice) == (b.argmax_id, b.choice, b.free_choice)
        assert all(abs(a.logprobs[c] - b.logprobs[c]) <= ATOL for c in choices)

    for bad, n in (("yes please", 2), ("", 0)):
        with pytest.raises(ValueError, match=f"choice {bad!r} is {n} tokens"):
            gen.score_choices(CONVERSATIONS, ["A", bad])
    with pytest.raises(ValueError, match="listed twice"):
        gen.score_choices(CONVERSATIONS, ["A", "A"])


def test_progress_callback(models, toks):
    seen = []
    gen = _generator(models, toks, "seed-oss", progress=lambda d, t: seen.append((d, t)))
    gen.score_choices(CONVERSATIONS, ["B"], batch_size=3)
    gen.generate(CONVERSATIONS[:1], max_new_tokens=2)
    assert seen == [(3, 4), (4, 4), (1, 1)]


def test_wrong_tokenizer_refused(models, toks):
    with pytest.raises(KeyError, match="not a seed-oss tokenizer"):
        Generator(models["qwen2.5"], toks["qwen2.5"], "seed-oss")
    with pytest.raises(ValueError, match="has 151665 tokens but the model only 576"):
        Generator(models["seed-oss"], toks["qwen2.5"], "qwen2.5")


# --------------------------------------------------------------------------------------------
# load_model with adapters
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _randomise_B(model, level, seed):
    g = torch.Generator().manual_seed(seed)
    for pname, p in model.named_parameters():
        if pname.endswith(f".lora.{level}.B"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def test_load_model_stacks_adapters(ckpts, tmp_path):
    ref = em.from_pretrained(ckpts["seed-oss"], dtype=torch.float32)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    base = ref(ids)
    lora.apply_lora(ref, LoraConfig(r=4, alpha=8.0), seed=1)
    _randomise_B(ref, 0, seed=1)
    write_peft_adapter(tmp_path / "a1", *lora.adapter_state(ref))
    one = ref(ids)
    lora.apply_lora(ref, LoraConfig(r=2, alpha=4.0, target_modules=("q_proj", "down_proj")), seed=2)
    _randomise_B(ref, 1, seed=2)
    write_peft_adapter(tmp_path / "a2", *lora.adapter_state(ref))
    both = ref(ids)

    model = load_model(ckpts["seed-oss"], adapters=[tmp_path / "a1", str(tmp_path / "a2")], dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {n.rsplit(".", 2)[1] for n, _ in model.named_parameters() if lora.is_lora_parameter_name(n)} == {"0", "1"}
    got = model(ids)
    assert (got - both).abs().max() <= ATOL
    assert (both - one).abs().max() > 1e-3 and (one - base).abs().max() > 1e-3  # each adapter matters
    assert (load_model(ckpts["seed-oss"], adapters=[tmp_path / "a1"], dtype=torch.float32)(ids) - one).abs().max() <= ATOL
    assert load_model(ckpts["seed-oss"], dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_load_model_refuses_adapter_of_another_model(ckpts, tmp_path):
    other = em.from_pretrained(ckpts["qwen2.5"], dtype=torch.float32)
    lora.apply_lora(other, LoraConfig(r=4, alpha=8.0, target_modules=("o_proj",)), seed=0)
    write_peft_adapter(tmp_path / "qwen_adapter", *lora.adapter_state(other))
    with pytest.raises(LoraError, match=r"o_proj: A has shape \(4, 32\), expected \(4, 48\).*different base model"):
        load_model(ckpts["seed-oss"], adapters=[tmp_path / "qwen_adapter"], dtype=torch.float32)
    with pytest.raises(LoraError, match="no adapter_config.json"):
        load_model(ckpts["seed-oss"], adapters=[tmp_path], dtype=torch.float32)
    with pytest.raises(TypeError, match="list of adapter directories"):
        load_model(ckpts["seed-oss"], adapters=str(tmp_path / "qwen_adapter"))


def test_answer_prefix_is_scored_after(tmp_path):
    """With an answer prefix, choices are scored after it: equal to scoring the prompt + prefix text."""
    import torch.nn.functional as F

    from engine.chat.seed_oss import NO_THINKING_ANSWER_PREFIX
    from engine.generate import Generator, load_model
    from engine.tokenizer import Tokenizer
    from tests.tiny import tiny_seed_oss_checkpoint

    ckpt = tiny_seed_oss_checkpoint(tmp_path / "m")
    model = load_model(ckpt, dtype=torch.float32)
    tok = Tokenizer.from_file(ckpt)
    conv = [{"role": "user", "content": "Which? Answer 1 or 2."}]
    gen = Generator(model, tok, "seed-oss", thinking_budget=0, answer_prefix=NO_THINKING_ANSWER_PREFIX, progress=False)
    text = gen.prompt_text(conv)
    assert text.endswith("<seed:bos>assistant\n<seed:think><seed:cot_budget_reflect>" + NO_THINKING_ANSWER_PREFIX)
    ids = tok.encode(text)
    with torch.no_grad():
        expected = F.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
    score = gen.score_choices([conv], ["1", "2"])[0]
    for c in ("1", "2"):
        assert abs(score.logprobs[c] - expected[tok.encode(c)[0]].item()) <= 1e-5
    plain = Generator(model, tok, "seed-oss", thinking_budget=0, progress=False).score_choices([conv], ["1", "2"])[0]
    assert plain.logprobs != score.logprobs
