"""Chat-template renderers (Qwen2.5-Instruct, Seed-OSS-36B-Instruct) with system-prompt control.

    rendered = render("qwen2.5", messages, SystemPolicy("omit"))   # .segments, .system, .text
    enc = encode(tokenizer, rendered)          # input_ids + labels (-100 = masked)

Each template module (`qwen25`, `seed_oss`) holds everything specific to its model family:

    NAME, DEFAULT_SYSTEM       the template's name; the system text it inserts by itself (or None)
    SPECIAL_TOKENS             its control tokens by role name ({"im_end": "<|im_end|>", ...})
    STOP_TOKENS                names of the control tokens that end an assistant turn in generation
    DELIMITER_TOKENS           names of the control tokens that open and close turns (and texts):
                               the tokenizer must flag them special
    HAS_THINKING_BUDGET        whether `render` takes a `thinking_budget`
    render(messages, policy, *, add_generation_prompt, thinking_budget) -> Rendered
    answer_prefix(thinking_budget) -> str         what the model writes itself before its answer
    strip_thinking(tokenizer, token_ids) -> ids   the answer part of generated tokens

A new model family is one more such module, registered in `TEMPLATES`.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.chat import qwen25, seed_oss
from engine.chat.base import (
    POLICIES, ChatFormatError, Rendered, Segment, SystemPolicy, control_token_ids, validate_messages,
)
from engine.chat.encode import IGNORE_INDEX, Encoded, encode, encode_batch
from engine.errors import TokenizerError
from engine.tokenizer import Tokenizer

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
) -> Rendered:
    return get_template(template).render(
        messages, policy, add_generation_prompt=add_generation_prompt, thinking_budget=thinking_budget
    )


def render_text(template: str, messages: list[dict], policy: SystemPolicy = SystemPolicy(), **kwargs) -> str:
    return render(template, messages, policy, **kwargs).text


def special_ids(tokenizer: Tokenizer, template: str, names: Iterable[str] | None = None) -> dict[str, int]:
    """Ids of the template's control tokens (all, or just `names`, e.g. ["im_end"]) in `tokenizer`.

    Raises MissingTokenError naming the token when the tokenizer lacks one: a tokenizer of
    another model family than the template's is refused here, clearly.
    """
    return control_token_ids(tokenizer, template, get_template(template).SPECIAL_TOKENS, names)


def check_tokenizer(tokenizer: Tokenizer, template: str, *, model_vocab_size: int | None = None,
                    model: str | None = None) -> dict[str, int]:
    """Refuse a tokenizer that does not fit the chat template (and the model); return the ids of
    the template's control tokens. Every job that renders chats calls it before it loads anything
    heavy: the trainer, the evals' model loading and the audit.

    - every control token of the template is in the tokenizer as an added token, matched whole in
      text (`special_ids`): otherwise "<seed:bos>" would be split into ordinary pieces and trained
      as text;
    - the turn delimiters (`DELIMITER_TOKENS`) are flagged special, as in the model's own
      tokenizer: answers are read with `decode(skip_special_tokens=True)`, which must drop them;
    - with `model_vocab_size` (the rows of the model's embedding): every token id has a row.
    """
    ids = special_ids(tokenizer, template)
    module = get_template(template)
    plain = [f"{name}={module.SPECIAL_TOKENS[name]!r}" for name in module.DELIMITER_TOKENS
             if not tokenizer.is_special(ids[name])]
    if plain:
        raise TokenizerError(
            f"Tokenizer {tokenizer.where} has the {template} control token(s) {', '.join(plain)} as ordinary "
            f"added tokens, not special ones (as the model's own tokenizer has them); decoding would keep them "
            f"in answers. Use the model's unmodified tokenizer.json."
        )
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        where = f" of model {model}" if model else ""
        raise TokenizerError(
            f"Tokenizer {tokenizer.where} has {tokenizer.vocab_size} token ids but the embedding{where} has "
            f"{model_vocab_size} rows: ids from {model_vocab_size} on have no embedding, so it is not this model's "
            f"tokenizer. Pass the model's own tokenizer (or none: the one in its checkpoint directory)."
        )
    return ids


__all__ = [
    "POLICIES", "TEMPLATES", "ChatFormatError", "Encoded", "IGNORE_INDEX", "Rendered", "Segment", "SystemPolicy",
    "check_tokenizer", "encode", "encode_batch", "get_template", "render", "render_text", "special_ids",
    "validate_messages",
]
