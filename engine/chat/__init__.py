"""Chat-template renderers (Qwen2.5-Instruct, Seed-OSS-36B-Instruct) with system-prompt control.

    segments = render("qwen2.5", messages, SystemPolicy("omit"))
    enc = encode(tokenizer, segments)          # input_ids + labels (-100 = masked)
"""

from __future__ import annotations

from engine.chat import qwen25, seed_oss
from engine.chat.base import POLICIES, ChatFormatError, Segment, SystemPolicy, validate_messages
from engine.chat.encode import IGNORE_INDEX, Encoded, encode

TEMPLATES = {qwen25.NAME: qwen25, seed_oss.NAME: seed_oss}


def get_template(name: str):
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ChatFormatError(f"unknown chat template {name!r}; available: {', '.join(TEMPLATES)}") from None


def render(
    template: str,
    messages: list[dict],
    policy: SystemPolicy = SystemPolicy(),
    *,
    add_generation_prompt: bool = False,
    thinking_budget: int | None = None,
) -> list[Segment]:
    return get_template(template).render(
        messages, policy, add_generation_prompt=add_generation_prompt, thinking_budget=thinking_budget
    )


def render_text(template: str, messages: list[dict], policy: SystemPolicy = SystemPolicy(), **kwargs) -> str:
    return "".join(s.text for s in render(template, messages, policy, **kwargs))


__all__ = [
    "POLICIES", "TEMPLATES", "ChatFormatError", "Encoded", "IGNORE_INDEX", "Segment", "SystemPolicy",
    "encode", "get_template", "render", "render_text", "validate_messages",
]
