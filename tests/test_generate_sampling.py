"""engine.generate's sampling controls: top-k, the warper order (against transformers' own
logits processors), and per-conversation random streams (`sample_keys`)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from engine.generate import Generator, load_model, sampling_probs, top_k_filter
from tests.tiny import tiny_seed_oss_checkpoint


def test_top_k_filter_by_hand():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.5, 0.2, 0.2, 0.1]])
    kept = top_k_filter(probs, 2)
    # Row 1: 0.4 and 0.3 kept (renormalised over 0.7); row 2: all tie with the 2nd, all kept;
    # row 3: 0.5 and both 0.2 (tied with the 2nd), renormalised over 0.9.
    assert torch.allclose(kept, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7], [0.25] * 4, [5 / 9, 2 / 9, 2 / 9, 0.0]]))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 50, 0.9), (1.5, 5, 0.9), (1.3, 0, 0.5), (0.5, 200, 0.95)])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    """The distribution `Generator` samples from equals transformers' sampling path for the same
    settings: its own logits processors (temperature, then top-k, then top-p), then softmax. The
    order matters: at (0.7, 50, 0.9) temperature last, at (1.5, 5, 0.9) top-p before top-k, would
    move some probabilities by more than 0.08."""
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    processors = hf._get_logits_processor(generation_config=config, input_ids_seq_length=1, logits_processor=None)
    logits = torch.randn(6, 300) * 3
    logits[0, :10] = 5.0  # ties at the top-k boundary
    expected = torch.softmax(processors(torch.zeros(6, 1, dtype=torch.long), logits.clone()), dim=-1)
    got = sampling_probs(logits, temperature, top_p, top_k)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    from engine.tokenizer import Tokenizer

    ckpt = tiny_seed_oss_checkpoint(tmp_path_factory.mktemp("seed"))
    return Generator(load_model(ckpt, dtype=torch.float32), Tokenizer.from_file(ckpt), "seed-oss", thinking_budget=0,
                     progress=False)


CONVS = [[{"role": "user", "content": text}] for text in ("Hi", "What is two plus two?", "Tell me a story.")]


def test_top_k_one_is_greedy_and_bad_values_refused(gen):
    greedy = gen.generate(CONVS, max_new_tokens=6)
    assert gen.generate(CONVS, max_new_tokens=6, temperature=1.5, top_k=1, seed=3) == greedy
    sampled = gen.generate(CONVS, max_new_tokens=6, temperature=1.5, seed=3)
    assert gen.generate(CONVS, max_new_tokens=6, temperature=1.5, seed=3, top_k=0) == sampled  # 0: no limit
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="top_k must be"):
            gen.generate(CONVS, temperature=1.0, top_k=bad)


def test_sample_keys_make_draws_independent_of_position(gen):
    kwargs = dict(max_new_tokens=8, temperature=1.2, top_k=20, top_p=0.95, seed=7)
    keys = ["a/0", "b/1", "c/2"]
    together = gen.generate(CONVS, sample_keys=keys, **kwargs)
    # The same (conversation, key) alone, or elsewhere in another batch, draws the same tokens.
    assert gen.generate([CONVS[2]], sample_keys=["c/2"], **kwargs) == [together[2]]
    assert gen.generate([CONVS[2], CONVS[0]], sample_keys=["c/2", "a/0"], batch_size=1, **kwargs) == [together[2], together[0]]
    # Without keys a conversation's stream is its index: moving it changes its draws.
    by_index = gen.generate(CONVS, **kwargs)
    assert gen.generate([CONVS[0]], **kwargs) == [by_index[0]]
    assert [c.token_ids for c in gen.generate(CONVS, sample_keys=["x", "y", "z"], **kwargs)] != [c.token_ids for c in together]
    with pytest.raises(ValueError, match="sample_keys has 2 keys for 3"):
        gen.generate(CONVS, sample_keys=keys[:2], **kwargs)
