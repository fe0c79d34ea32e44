"""Qwen2.5-Instruct chat template, system/user/assistant conversations.

Byte-identical to the official Jinja template (tokenizer_config.json of Qwen2.5-*-Instruct) for
conversations without tools:

    <|im_start|>system\n{system}<|im_end|>\n          (default system text when none is given)
    <|im_start|>{role}\n{content}<|im_end|>\n           for every other message, content verbatim
    <|im_start|>assistant\n                             generation prompt

Labels: an assistant turn trains `{content}<|im_end|>`; the header `<|im_start|>assistant\n` and the
newline after `<|im_end|>` are masked.

The template has no thinking mode: no thinking budget, no answer prefix, nothing to strip from a
generated answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.chat.base import ChatFormatError, Rendered, Segment, SystemPolicy, apply_policy, validate_messages
from engine.tokenizer import Tokenizer

NAME = "qwen2.5"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Control tokens by role name.
SPECIAL_TOKENS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "tool_call_start": "<tool_call>",
    "tool_call_end": "</tool_call>",
}
STOP_TOKENS = ("im_end", "endoftext")  # either ends an assistant turn in generation
DELIMITER_TOKENS = ("im_start", "im_end", "endoftext")  # flagged special in the model's tokenizer (<tool_call> is not)
HAS_THINKING_BUDGET = False


def render(
    messages: list[dict],
    policy: SystemPolicy = SystemPolicy(),
    *,
    add_generation_prompt: bool = False,
    thinking_budget: int | None = None,
) -> Rendered:
    _refuse_thinking_budget(thinking_budget)
    validate_messages(messages, allow_reasoning=False, require_assistant=not add_generation_prompt)
    system, rest = apply_policy(messages, policy, DEFAULT_SYSTEM)
    segments: list[Segment] = []
    if system is not None:
        segments.append(Segment(f"<|im_start|>system\n{system}<|im_end|>\n", False, "system"))
    for message in rest:
        role, content = message["role"], message["content"]
        if role == "assistant":
            segments += [
                Segment("<|im_start|>assistant\n", False, role),
                Segment(f"{content}<|im_end|>", True, role),
                Segment("\n", False, role),
            ]
        else:
            segments.append(Segment(f"<|im_start|>{role}\n{content}<|im_end|>\n", False, role))
    if add_generation_prompt:
        segments.append(Segment("<|im_start|>assistant\n", False, "prompt"))
    return Rendered(segments, system)


def answer_prefix(thinking_budget: int | None = None) -> str:
    """Text the model writes itself before its answer: none."""
    _refuse_thinking_budget(thinking_budget)
    return ""


def strip_thinking(tokenizer: Tokenizer, token_ids: Sequence[int]) -> list[int]:
    """The answer part of generated tokens: all of them (there is no thinking block)."""
    return list(token_ids)


def _refuse_thinking_budget(thinking_budget: int | None) -> None:
    if thinking_budget is not None:
        raise ChatFormatError(f"the {NAME} chat template has no thinking budget (thinking_budget must be None, "
                              f"got {thinking_budget!r})")
