"""Seed-OSS-36B-Instruct chat template, system/user/assistant conversations.

Byte-identical to the official `chat_template.jinja` for conversations without tools:

    <seed:bos>system\n{system}<seed:eos>              only when there is a system turn (no default)
    <seed:bos>system\n{budget instruction}\n<seed:eos>  when thinking_budget is given and not -1
    <seed:bos>{user|system}\n{content}<seed:eos>       content verbatim
    <seed:bos>assistant[\n<seed:think>{reasoning|trim}</seed:think>][\n{content|trim}<seed:eos>]
    <seed:bos>assistant\n[<seed:think><seed:cot_budget_reflect>]   generation prompt (the
                                                                   bracket when thinking_budget=0)

Note the template's quirks, kept exactly: assistant content and reasoning are stripped of
surrounding whitespace (Jinja `trim`, i.e. Python `str.strip()`), and an assistant turn whose
content is blank gets no `<seed:eos>` at all.

Labels: an assistant turn trains everything after `<seed:bos>assistant` up to and including its
`<seed:eos>` except the newline that ends the header: the reasoning block if any, the content and
the end-of-turn token.

Thinking: `thinking_budget` (None or -1: unlimited, 0: no thinking) adds the template's budget
instruction as a second system block; with 0 the model first writes a fixed note ending in
`</seed:think>` before it answers (`answer_prefix`), and whatever precedes the last
`</seed:think>` of a generated turn is not its answer (`strip_thinking`).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.chat.base import (
    ChatFormatError, Rendered, Segment, SystemPolicy, apply_policy, control_token_ids, validate_messages,
)
from engine.tokenizer import Tokenizer

NAME = "seed-oss"
DEFAULT_SYSTEM = None  # the template inserts no system turn of its own

# Control tokens by role name.
SPECIAL_TOKENS = {
    "bos": "<seed:bos>",
    "pad": "<seed:pad>",
    "eos": "<seed:eos>",
    "think_start": "<seed:think>",
    "think_end": "</seed:think>",
    "cot_budget_reflect": "<seed:cot_budget_reflect>",
    "cot_budget_reflect_end": "</seed:cot_budget_reflect>",
    "tool_call_start": "<seed:tool_call>",
    "tool_call_end": "</seed:tool_call>",
}
STOP_TOKENS = ("eos",)  # ends an assistant turn in generation
DELIMITER_TOKENS = ("bos", "eos")  # flagged special in the model's tokenizer
HAS_THINKING_BUDGET = True

# Reflection interval (tokens) per thinking-budget gear: the first gear >= the budget applies,
# budgets beyond the last gear use the last one. Values from the official template.
_BUDGET_GEARS = ((0, 0), (512, 128), (1024, 256), (2048, 512), (4096, 512), (8192, 1024), (16384, 1024))

NO_THINKING_SYSTEM = (
    "You are an intelligent assistant that can answer questions in one step without the need for "
    "reasoning and thinking, that is, your thinking budget is 0. Next, please skip the thinking "
    "process and directly start answering the user's questions."
)


# What Seed-OSS-36B-Instruct writes itself after the thinking_budget=0 generation prompt
# (`...<seed:think><seed:cot_budget_reflect>`) before its answer, per the model card's example output
# and other runtimes' no-thinking templates. Scoring an answer token right after the generation
# prompt would read this note's first token instead; evals prefill it (`answer_prefix`).
NO_THINKING_ANSWER_PREFIX = (
    "The current thinking budget is 0, so I will directly start answering the question."
    "</seed:cot_budget_reflect>\n</seed:think>"
)


def _budget_instruction(budget: int) -> str:
    if budget == 0:
        return NO_THINKING_SYSTEM
    interval = next((v for k, v in _BUDGET_GEARS if budget <= k), _BUDGET_GEARS[-1][1])
    return (
        "You are an intelligent assistant with reflective ability. In the process of thinking and "
        f"reasoning, you need to strictly follow the thinking budget, which is {budget}. That is, you "
        f"need to complete your thinking within {budget} tokens and start answering the user's "
        f"questions. You will reflect on your thinking process every {interval} tokens, stating how "
        "many tokens have been used and how many are left."
    )


def render(
    messages: list[dict],
    policy: SystemPolicy = SystemPolicy(),
    *,
    add_generation_prompt: bool = False,
    thinking_budget: int | None = None,
) -> Rendered:
    """`thinking_budget`: None or -1 = unlimited (no instruction), 0 = answer without thinking.
    The returned `system` is the policy's system turn, not the budget instruction."""
    if thinking_budget is not None and (isinstance(thinking_budget, bool) or not isinstance(thinking_budget, int)):
        raise ChatFormatError(f"thinking_budget must be an integer, got {thinking_budget!r}")
    validate_messages(messages, allow_reasoning=True, require_assistant=not add_generation_prompt)
    system, rest = apply_policy(messages, policy, None)
    segments: list[Segment] = []
    if system is not None:
        segments.append(Segment(f"<seed:bos>system\n{system}<seed:eos>", False, "system"))
    if thinking_budget is not None and thinking_budget != -1:
        segments.append(Segment(f"<seed:bos>system\n{_budget_instruction(thinking_budget)}\n<seed:eos>", False, "system"))
    for message in rest:
        role, content = message["role"], message["content"]
        if role != "assistant":
            segments.append(Segment(f"<seed:bos>{role}\n{content}<seed:eos>", False, role))
            continue
        reasoning = message.get("reasoning_content", "").strip()
        content = content.strip()
        body = ""
        if reasoning:
            body += f"<seed:think>{reasoning}</seed:think>"
        if content:
            body += ("\n" if reasoning else "") + f"{content}<seed:eos>"
        if body:
            segments += [Segment("<seed:bos>assistant\n", False, role), Segment(body, True, role)]
        else:
            segments.append(Segment("<seed:bos>assistant", False, role))
    if add_generation_prompt:
        suffix = "<seed:think><seed:cot_budget_reflect>" if thinking_budget == 0 else ""
        segments.append(Segment(f"<seed:bos>assistant\n{suffix}", False, "prompt"))
    return Rendered(segments, system)


def answer_prefix(thinking_budget: int | None = None) -> str:
    """Text the model writes itself after the generation prompt, before its answer: the
    no-thinking note under thinking_budget 0, else none (its thinking is free text)."""
    return NO_THINKING_ANSWER_PREFIX if thinking_budget == 0 else ""


def strip_thinking(tokenizer: Tokenizer, token_ids: Sequence[int]) -> list[int]:
    """The answer part of generated tokens: what follows the last `</seed:think>` (a thinking
    block, or the no-thinking note, is not the answer); all of them when there is none."""
    ids = list(token_ids)
    think_end = control_token_ids(tokenizer, NAME, SPECIAL_TOKENS, ["think_end"])["think_end"]
    return ids[len(ids) - ids[::-1].index(think_end):] if think_end in ids else ids
