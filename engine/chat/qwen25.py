"""Qwen2.5-Instruct chat template, system/user/assistant conversations.

Byte-identical to the official Jinja template (tokenizer_config.json of Qwen2.5-*-Instruct) for
conversations without tools:

    <|im_start|>system\n{system}<|im_end|>\n          (default system text when none is given)
    <|im_start|>{role}\n{content}<|im_end|>\n           for every other message, content verbatim
    <|im_start|>assistant\n                             generation prompt

Labels: an assistant turn trains `{content}<|im_end|>`; the header `<|im_start|>assistant\n` and the
newline after `<|im_end|>` are masked.
"""

from __future__ import annotations

from engine.chat.base import ChatFormatError, Segment, SystemPolicy, apply_policy, validate_messages

NAME = "qwen2.5"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
END_OF_TURN = "<|im_end|>"


def render(
    messages: list[dict],
    policy: SystemPolicy = SystemPolicy(),
    *,
    add_generation_prompt: bool = False,
    thinking_budget: int | None = None,
) -> list[Segment]:
    if thinking_budget is not None:
        raise ChatFormatError("thinking_budget is a Seed-OSS template option; the Qwen2.5 template has none")
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
    return segments
