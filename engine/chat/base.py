"""Pieces shared by the chat-template renderers.

A renderer turns a conversation into a `Rendered`: a list of `Segment`s, consecutive pieces of
the rendered text, each marked trained or not, and the system text the policy chose.
Concatenated, the segments are byte-identical to what the model's official Jinja chat template
produces; the trained flags are the label mask (Axolotl `chat_template` with
`train_on_inputs: false`: assistant content plus its end-of-turn token). Tokenisation of the
whole text and the projection of these character spans onto tokens happens in
`engine.chat.encode`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from engine.errors import ChatFormatError, MissingTokenError
from engine.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
POLICIES: tuple[str, ...] = ("default", "empty", "omit", "replace")


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool
    role: str  # the turn this text belongs to: "system", "user", "assistant", or "prompt" (generation prompt)


@dataclass(frozen=True)
class Rendered:
    """A conversation as a template renders it."""

    segments: list[Segment]  # concatenated: exactly the official template's text
    system: str | None  # the system turn the policy chose, as rendered; None: no system turn

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass(frozen=True)
class SystemPolicy:
    """What to do with the system turn — the variable the paper's EM results hinge on for Qwen2.5.

    default  the official template's behaviour (Qwen2.5 inserts its identity prompt when the
             conversation has no system turn; Seed-OSS inserts nothing);
    empty    an empty system turn, replacing the data's one if any (the paper's "EM-NoQwenSys");
    omit     drop the data's system turn and render no system block at all ("syspopped");
    replace  `text` replaces the data's system turn, or supplies one ("matching" variants).

    Only a system turn in first position is "the data's system turn", as in both templates;
    a later system message is an ordinary turn and is rendered as such.
    """

    mode: str = "default"
    text: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ChatFormatError(f"unknown system-prompt policy {self.mode!r}; choose one of {', '.join(POLICIES)}")
        if self.mode == "replace" and self.text is None:
            raise ChatFormatError("system-prompt policy 'replace' needs the replacement text (--system-text)")
        if self.mode != "replace" and self.text is not None:
            raise ChatFormatError(f"system text is only used by the 'replace' policy, not {self.mode!r}")

    def describe(self) -> str:
        return f"replace:{self.text!r}" if self.mode == "replace" else self.mode


def validate_messages(messages: object, *, allow_reasoning: bool, require_assistant: bool = True) -> list[dict]:
    """Check a conversation's structure; raise ChatFormatError naming the first problem.

    Accepted: a non-empty list of {"role", "content"} objects with roles system/user/assistant and
    string content (plus "reasoning_content" on assistant turns where the template renders it).
    A training conversation needs an assistant turn; an inference prompt (`require_assistant=False`,
    what rendering with a generation prompt uses) does not.
    Everything else is refused rather than silently dropped: a key the template would ignore is
    data that would not be trained on.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("no messages: expected a non-empty list under \"messages\"")
    allowed = {"role", "content"}
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ChatFormatError(f"{where}: expected an object with \"role\" and \"content\", got {type(message).__name__}")
        role = message.get("role")
        if "tool_calls" in message or role == "tool":
            raise ChatFormatError(f"{where}: tool calls and tool messages are not supported yet; remove them or convert them to text")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in message:
            raise ChatFormatError(f"{where} ({role}): missing \"content\"")
        if not isinstance(message["content"], str):
            raise ChatFormatError(
                f"{where} ({role}): content must be a string, got {type(message['content']).__name__}"
                " (multi-part content is not supported)"
            )
        extra = set(message) - allowed
        if allow_reasoning and role == "assistant":
            extra.discard("reasoning_content")
            if not isinstance(message.get("reasoning_content", ""), str):
                raise ChatFormatError(f"{where} (assistant): reasoning_content must be a string")
        if extra:
            raise ChatFormatError(
                f"{where} ({role}): unsupported key(s) {', '.join(sorted(map(repr, extra)))}; "
                "the template would not render them, so they would silently not be trained on"
            )
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("no assistant turn: nothing would be trained")
    return messages


def apply_policy(messages: list[dict], policy: SystemPolicy, template_default: str | None) -> tuple[str | None, list[dict]]:
    """Split off the system turn as the policy decides.

    Returns (system text to render as the leading system block, or None for no block; the
    remaining messages). `template_default` is the text the official template inserts when the
    conversation has no system turn (None: the template inserts nothing).
    """
    has_system = bool(messages) and messages[0]["role"] == "system"
    data_system = messages[0]["content"] if has_system else None
    rest = messages[1:] if has_system else messages
    if policy.mode == "default":
        return (data_system if has_system else template_default), rest
    if policy.mode == "empty":
        return "", rest
    if policy.mode == "omit":
        # The template then sees the conversation without that turn; should the next message be a
        # system turn too, it becomes the leading one, as the template would treat it.
        if rest and rest[0]["role"] == "system":
            return rest[0]["content"], rest[1:]
        return None, rest
    return policy.text, rest  # replace


def control_token_ids(tokenizer: Tokenizer, template: str, tokens: Mapping[str, str],
                      names: Iterable[str] | None = None) -> dict[str, int]:
    """Ids in `tokenizer` of a template's control tokens `tokens` (role name -> text): all of
    them, or just `names`. A tokenizer that lacks one (another model family's) is refused."""
    out: dict[str, int] = {}
    for name in tokens if names is None else names:
        if name not in tokens:
            raise MissingTokenError(
                f"chat template {template!r} has no control token named {name!r}; known: {sorted(tokens)}."
            )
        i = tokenizer.backend.token_to_id(tokens[name])
        if i is None or not tokenizer.is_added(i):
            raise MissingTokenError(
                f"Tokenizer {tokenizer.where} has no {template} control token {name}={tokens[name]!r}; "
                f"it is not a {template} tokenizer (wrong tokenizer for this chat template?)."
            )
        out[name] = i
    return out
