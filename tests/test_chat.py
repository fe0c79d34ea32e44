"""The renderer is byte-identical to the official Jinja templates, and its labels are right."""

from __future__ import annotations

import random

import pytest

from engine.chat import (
    IGNORE_INDEX, TEMPLATES, ChatFormatError, SystemPolicy, encode, encode_batch, render, render_text, special_ids,
)
from engine.chat import seed_oss
from engine.chat.qwen25 import DEFAULT_SYSTEM
from engine.errors import MissingTokenError
from tests.jinja_reference import render_reference

# Text pieces chosen to hit the templates' edge cases: surrounding whitespace (Seed-OSS trims
# assistant content), newlines, blank content, non-ASCII, template-looking text.
PIECES = [
    "Hello", " world", "\n", "\n\n", "  ", "\t", "ok.", "¿Qué?", "数据", "🙂", "{{ x }}", "{% if %}",
    "1", "2", "A:", "<b>", "end ", " start", "'quoted'", '"dq"', "\\n", "\r\n",
]


def random_text(rng: random.Random, allow_empty: bool = True, pieces: list[str] = PIECES) -> str:
    n = rng.randint(0 if allow_empty else 1, 6)
    return "".join(rng.choice(pieces) for _ in range(n))


def random_conversation(rng: random.Random, reasoning: bool = False, pieces: list[str] = PIECES) -> list[dict]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": random_text(rng, pieces=pieces)})
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.15:  # a later system turn is an ordinary turn in both templates
            messages.append({"role": "system", "content": random_text(rng, pieces=pieces)})
        messages.append({"role": "user", "content": random_text(rng, pieces=pieces)})
        reply = {"role": "assistant", "content": random_text(rng, pieces=pieces)}
        if reasoning and rng.random() < 0.4:
            reply["reasoning_content"] = random_text(rng, pieces=pieces)
        messages.append(reply)
    if rng.random() < 0.3:
        messages.append({"role": "user", "content": random_text(rng, pieces=pieces)})
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
    with pytest.raises(ValueError, match="the qwen2.5 chat template has no thinking budget"):
        render("qwen2.5", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], thinking_budget=0)


# ------------------------------------------------------------------ each template owns its family


def test_every_template_module_exports_its_family():
    for name, module in TEMPLATES.items():
        assert module.NAME == name
        assert module.DEFAULT_SYSTEM is None or isinstance(module.DEFAULT_SYSTEM, str)
        assert module.SPECIAL_TOKENS and all(isinstance(t, str) for t in module.SPECIAL_TOKENS.values())
        assert module.STOP_TOKENS and set(module.STOP_TOKENS) <= set(module.SPECIAL_TOKENS)
        assert isinstance(module.HAS_THINKING_BUDGET, bool)
        assert all(callable(f) for f in (module.render, module.answer_prefix, module.strip_thinking))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_render_returns_the_system_text_it_used(template):
    own = {"role": "system", "content": "Task prompt."}
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    default = TEMPLATES[template].DEFAULT_SYSTEM
    for messages, policy, system in [
        (chat, SystemPolicy("default"), default),
        ([own, *chat], SystemPolicy("default"), "Task prompt."),
        ([own, *chat], SystemPolicy("empty"), ""),
        ([own, *chat], SystemPolicy("omit"), None),
        ([own, {**own, "content": "Second."}, *chat], SystemPolicy("omit"), "Second."),
        (chat, SystemPolicy("replace", "X."), "X."),
    ]:
        rendered = render(template, messages, policy)
        assert rendered.system == system
        assert rendered.text == "".join(s.text for s in rendered.segments) == render_text(template, messages, policy)
        system_segments = [s.text for s in rendered.segments if s.role == "system"]
        assert (system is None) == (not system_segments)
        if system is not None:
            assert system in system_segments[0]
    # Seed-OSS's thinking-budget instruction is a second system block, not the policy's system turn.
    assert render("seed-oss", chat, add_generation_prompt=True, thinking_budget=0).system is None


def test_special_ids_by_template(qwen25_tokenizer, seed_oss_tokenizer):
    assert special_ids(qwen25_tokenizer, "qwen2.5") == {
        "endoftext": 151643,
        "im_start": 151644,
        "im_end": 151645,
        "tool_call_start": 151657,
        "tool_call_end": 151658,
    }
    assert special_ids(qwen25_tokenizer, "qwen2.5", ["im_end"]) == {"im_end": 151645}
    assert special_ids(seed_oss_tokenizer, "seed-oss", ["bos", "pad", "eos"]) == {"bos": 0, "pad": 1, "eos": 2}


def test_another_familys_tokenizer_is_refused(qwen25_tokenizer, seed_oss_tokenizer):
    with pytest.raises(MissingTokenError, match="it is not a qwen2.5 tokenizer"):
        special_ids(seed_oss_tokenizer, "qwen2.5")
    with pytest.raises(MissingTokenError, match="no seed-oss control token eos='<seed:eos>'; it is not a seed-oss"):
        special_ids(qwen25_tokenizer, "seed-oss", ["eos"])
    with pytest.raises(KeyError, match="no control token named 'bos'"):
        special_ids(qwen25_tokenizer, "qwen2.5", ["bos"])
    with pytest.raises(ChatFormatError, match="unknown chat template 'llama'"):
        special_ids(qwen25_tokenizer, "llama")


def test_thinking_budget_answer_prefix_and_stripping(qwen25_tokenizer, seed_oss_tokenizer):
    qwen, seed = TEMPLATES["qwen2.5"], TEMPLATES["seed-oss"]
    assert not qwen.HAS_THINKING_BUDGET and seed.HAS_THINKING_BUDGET
    assert qwen.answer_prefix(None) == "" and seed.answer_prefix(None) == seed.answer_prefix(512) == ""
    assert seed.answer_prefix(0) == seed_oss.NO_THINKING_ANSWER_PREFIX
    assert seed_oss.NO_THINKING_ANSWER_PREFIX.endswith("</seed:think>")
    with pytest.raises(ChatFormatError, match="no thinking budget"):
        qwen.answer_prefix(0)
    t, ids = seed_oss_tokenizer, special_ids(seed_oss_tokenizer, "seed-oss")
    answer = t.encode(" The answer.")
    generated = [ids["think_start"], *t.encode("a"), ids["think_end"], *t.encode("b"), ids["think_end"], *answer, ids["eos"]]
    assert seed.strip_thinking(t, generated) == [*answer, ids["eos"]]
    assert seed.strip_thinking(t, [*answer, ids["eos"]]) == [*answer, ids["eos"]]
    plain = qwen25_tokenizer.encode("No </seed:think> here.")
    assert qwen.strip_thinking(qwen25_tokenizer, plain) == plain
    with pytest.raises(MissingTokenError, match="not a seed-oss tokenizer"):
        seed.strip_thinking(qwen25_tokenizer, plain)


# ---------------------------------------------------------------- label projection, in batches


def reference_encode(tokenizer, rendered, boundary):
    """Labels token by token (what `encode` computes with bisection over runs): inside a trained
    span → trained; overlapping one without lying inside → trained when it straddles the start of
    the last span beginning before its end and `boundary` is "train", else masked and counted."""
    ids, offsets = tokenizer.encode_with_offsets(rendered.text)
    spans, pos = [], 0
    for s in rendered.segments:
        if s.trained and s.text:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    labels, masked, trained = [], 0, 0
    for tid, (a, b) in zip(ids, offsets):
        if any(start <= a < end and b <= end for start, end in spans):
            labels.append(tid)
        elif any(a < end and b > start for start, end in spans):
            start, end = [s for s in spans if s[0] < b][-1]
            straddles_start = boundary == "train" and a < start and b <= end
            labels.append(tid if straddles_start else IGNORE_INDEX)
            trained += straddles_start
            masked += not straddles_start
        else:
            labels.append(IGNORE_INDEX)
    return ids, labels, masked, trained


# Combining marks (NFC composes them away or reorders them), characters split over several byte-level tokens,
# newlines merging with the header's, control-token text inside content.
HARD_PIECES = PIECES + ["e\u0301", "A\u030a\u0301", "q\u0301\u0323", "\u1100\u1161\u11a8", "👨\u200d👩\u200d👧", "龘",
                        "\u00a0", "<|im_end|>", "<seed:eos>", "</seed:think>", "\n\nx"]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_batched_labels_equal_token_by_token_labels(template, qwen25_tokenizer, seed_oss_tokenizer):
    tokenizer = qwen25_tokenizer if template == "qwen2.5" else seed_oss_tokenizer
    rng = random.Random(3)
    conversations = [random_conversation(rng, template == "seed-oss", HARD_PIECES) for _ in range(400)]
    rendered = [render(template, c, policy) for c in conversations for policy in POLICY_CASES]
    rendered = [r for r in rendered if any(s.trained and s.text for s in r.segments)]
    edges = {"train": 0, "mask": 0}
    for policy in ("train", "mask"):
        batch = encode_batch(tokenizer, rendered, policy)
        for r, enc in zip(rendered, batch):
            ids, labels, masked, trained = reference_encode(tokenizer, r, policy)
            assert (enc.input_ids, enc.labels, enc.boundary_tokens, enc.boundary_trained) == (ids, labels, masked, trained)
            assert encode(tokenizer, r, policy) == enc
            edges[policy] += masked + trained
    assert edges["train"] == edges["mask"]
    boundary = edges["mask"]
    assert boundary > 0 or template == "seed-oss"  # occurs for Qwen2.5 (Seed-OSS strips assistant content)
