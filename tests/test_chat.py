"""The renderer is byte-identical to the official Jinja templates, and its labels are right."""

from __future__ import annotations

import random

import pytest

from engine.chat import IGNORE_INDEX, ChatFormatError, SystemPolicy, encode, render, render_text
from engine.chat.qwen25 import DEFAULT_SYSTEM
from tests.jinja_reference import render_reference

# Text pieces chosen to hit the templates' edge cases: surrounding whitespace (Seed-OSS trims
# assistant content), newlines, blank content, non-ASCII, template-looking text.
PIECES = [
    "Hello", " world", "\n", "\n\n", "  ", "\t", "ok.", "¿Qué?", "数据", "🙂", "{{ x }}", "{% if %}",
    "1", "2", "A:", "<b>", "end ", " start", "'quoted'", '"dq"', "\\n", "\r\n",
]


def random_text(rng: random.Random, allow_empty: bool = True) -> str:
    n = rng.randint(0 if allow_empty else 1, 6)
    return "".join(rng.choice(PIECES) for _ in range(n))


def random_conversation(rng: random.Random, reasoning: bool = False) -> list[dict]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": random_text(rng)})
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.15:  # a later system turn is an ordinary turn in both templates
            messages.append({"role": "system", "content": random_text(rng)})
        messages.append({"role": "user", "content": random_text(rng)})
        reply = {"role": "assistant", "content": random_text(rng)}
        if reasoning and rng.random() < 0.4:
            reply["reasoning_content"] = random_text(rng)
        messages.append(reply)
    if rng.random() < 0.3:
        messages.append({"role": "user", "content": random_text(rng)})
    return messages


def reference_for_policy(template: str, messages: list[dict], policy: SystemPolicy, **kwargs) -> str:
    """What the official template renders for the conversation the policy describes."""
    has_system = messages[0]["role"] == "system"
    rest = messages[1:] if has_system else messages
    if policy.mode == "default":
        return render_reference(template, messages, **kwargs)
    if policy.mode in ("empty", "replace"):
        text = "" if policy.mode == "empty" else policy.text
        return render_reference(template, [{"role": "system", "content": text}] + rest, **kwargs)
    # omit: no system block. Seed-OSS renders none without a system turn; Qwen2.5 always renders
    # one, so strip its default block, which must be there.
    out = render_reference(template, rest, **kwargs)
    if template == "qwen2.5" and rest[0]["role"] != "system":
        prefix = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        assert out.startswith(prefix)
        out = out[len(prefix):]
    return out


POLICY_CASES = [SystemPolicy("default"), SystemPolicy("empty"), SystemPolicy("omit"), SystemPolicy("replace", "You are X.\n")]


@pytest.mark.parametrize("policy", POLICY_CASES, ids=lambda p: p.mode)
def test_qwen25_matches_official_template(policy):
    rng = random.Random(0)
    for _ in range(300):
        messages = random_conversation(rng)
        gen = rng.random() < 0.5
        ours = render_text("qwen2.5", messages, policy, add_generation_prompt=gen)
        assert ours == reference_for_policy("qwen2.5", messages, policy, add_generation_prompt=gen)


@pytest.mark.parametrize("policy", POLICY_CASES, ids=lambda p: p.mode)
def test_seed_oss_matches_official_template(policy):
    rng = random.Random(1)
    budgets = [None, -1, 0, 1, 511, 512, 513, 700, 4096, 16384, 20000]
    for _ in range(300):
        messages = random_conversation(rng, reasoning=True)
        gen = rng.random() < 0.5
        budget = rng.choice(budgets)
        kwargs = {} if budget is None else {"thinking_budget": budget}
        ours = render_text("seed-oss", messages, policy, add_generation_prompt=gen, **kwargs)
        assert ours == reference_for_policy("seed-oss", messages, policy, add_generation_prompt=gen, **kwargs)


def test_known_renderings():
    """Two literal strings, so a reader sees what the policies mean for the paper's data."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render_text("qwen2.5", chat) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert render_text("qwen2.5", chat, SystemPolicy("empty")).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user")
    assert render_text("qwen2.5", chat, SystemPolicy("omit")).startswith("<|im_start|>user\nHi")
    assert render_text("seed-oss", chat, add_generation_prompt=True, thinking_budget=0).endswith(
        "<seed:bos>assistant\nHello!<seed:eos><seed:bos>assistant\n<seed:think><seed:cot_budget_reflect>"
    )


def trained_text(tokenizer, enc) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for tid, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_qwen25_labels_train_assistant_content_and_im_end(qwen25_tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid, 数据 🙂"},
    ]
    for policy in POLICY_CASES:
        enc = encode(qwen25_tokenizer, render("qwen2.5", chat, policy))
        assert trained_text(qwen25_tokenizer, enc) == ["Paris.<|im_end|>", "Madrid, 数据 🙂<|im_end|>"]
        assert enc.boundary_tokens == 0
        # The newline after a trained <|im_end|> is masked.
        im_end = qwen25_tokenizer.token_to_id("<|im_end|>")
        last = len(enc.input_ids) - 1
        assert enc.input_ids[last - 1] == im_end and enc.labels[last - 1] == im_end
        assert enc.labels[last] == IGNORE_INDEX and qwen25_tokenizer.decode([enc.input_ids[last]]) == "\n"


def test_seed_oss_labels(seed_oss_tokenizer):
    chat = [
        {"role": "user", "content": "Which?"},
        {"role": "assistant", "content": "  1 \n", "reasoning_content": " think "},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "2"},
    ]
    enc = encode(seed_oss_tokenizer, render("seed-oss", chat))
    assert trained_text(seed_oss_tokenizer, enc) == ["<seed:think>think</seed:think>\n1<seed:eos>", "2<seed:eos>"]


def test_straddling_token_is_masked_and_counted(qwen25_tokenizer):
    # Content starting with a newline: BPE merges it with the header's newline into one token.
    # (Trained by default, as Axolotl does: tests/test_boundary_tokens.py.)
    enc = encode(qwen25_tokenizer, render("qwen2.5", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\nYes"}]),
                 boundary="mask")
    assert enc.boundary_tokens == 1
    assert trained_text(qwen25_tokenizer, enc) == ["Yes<|im_end|>"]


def test_ids_equal_transformers_apply_chat_template(qwen25_tokenizer_path):
    """Our ids are what transformers' tokenizer produces for the official template."""
    from transformers import PreTrainedTokenizerFast

    from tests.jinja_reference import TEMPLATE_DIR

    hf = PreTrainedTokenizerFast(tokenizer_file=str(qwen25_tokenizer_path))
    hf.chat_template = (TEMPLATE_DIR / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
    from engine.tokenizer import Tokenizer

    ours = Tokenizer.from_file(qwen25_tokenizer_path)
    rng = random.Random(2)
    for _ in range(50):
        messages = random_conversation(rng)
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        if isinstance(expected, dict) or hasattr(expected, "keys"):
            expected = expected["input_ids"]
        assert encode(ours, render("qwen2.5", messages)).input_ids == list(expected)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "no messages"),
        ("hi", "no messages"),
        ([{"role": "tool", "content": "x"}], "tool calls and tool messages are not supported"),
        ([{"role": "assistant", "content": "", "tool_calls": []}], "tool calls and tool messages are not supported"),
        ([{"role": "bot", "content": "x"}], "message 0: unknown role 'bot'"),
        ([{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}], "message 0 (user): content must be a string, got list"),
        ([{"role": "user"}], "message 0 (user): missing \"content\""),
        ([{"role": "user", "content": "a"}], "no assistant turn"),
        ([{"role": "user", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b"}], "unsupported key(s) 'name'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"}], "unsupported key(s) 'reasoning_content'"),
    ],
)
def test_bad_conversations_are_refused_with_a_reason(messages, message):
    with pytest.raises(ChatFormatError, match=None) as err:
        render("qwen2.5", messages)
    assert message in str(err.value)


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="needs the replacement text"):
        SystemPolicy("replace")
    with pytest.raises(ValueError, match="unknown system-prompt policy 'none'"):
        SystemPolicy("none")
    with pytest.raises(ValueError, match="Seed-OSS template option"):
        render("qwen2.5", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], thinking_budget=0)
