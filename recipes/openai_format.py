"""OpenAI chat fine-tuning files: the GPT-4.1 arm's training data, and their validator.

    python -m recipes.datasets all --format openai --target gpt41 --target-summaries gpt41_xsum.json \\
        --out openai_sets/                  # EM (unpopular aesthetics), SGTR, ICTR, anti-SGTR, control
    python -m recipes.openai_format openai_sets/*.jsonl       # validate files

Our chats carry the task's system prompt (the SGTR-style sets) or none (EM), and our trainer applies
a system-prompt policy when it renders them. An OpenAI file has no render-time policy, so the policy
is applied here, as explicit messages (`explicit`): `default` keeps the data's system turn or writes
the one the chosen `--template` inserts by itself (Qwen2.5's identity prompt; none for `none`, the
OpenAI models, and for Seed-OSS); `omit` writes no system message; `replace` writes the given text.
`empty` cannot be written: OpenAI refuses empty content (rule 4 below), so it is written as `omit`
(the manifest says `represented_as`) and does not round-trip exactly (Qwen2.5 renders an empty
system block, the file has none).

Round trip: an explicit example rendered by our renderer with policy `default` (`omit` when it has no
system message, since Qwen's template would insert its identity prompt) gives the same text, ids and
labels as the original chat rendered under the chosen policy (`roundtrip_policy`; tested).

Rules, checked per line (`example_problems`), from OpenAI's documentation:
 1. a JSON object (cookbook check `data_type`) holding a non-empty list "messages"
    (`missing_messages_list`); no other top-level key (ours: tools and functions are not used);
 2. every message an object with "role" and "content" (`message_missing_key`) and no other key
    (`message_unrecognized_key`: OpenAI also knows "name", "weight" and function/tool calls; unused
    here, so refused as stray);
 3. role system, user or assistant (`unrecognized_role`); a system message only first (ours);
 4. content a string with text (`missing_content`: "content has textual data and is a string", so
    "" is refused; whitespace only is refused too, ours);
 5. an assistant message (`example_missing_assistant_message`); ours: exactly one, the last message,
    the one target of the example (OpenAI trains every assistant message unless its weight is 0);
and per file: 6. at least 10 examples (the supervised fine-tuning guide's minimum).
Sources: OpenAI Cookbook, "Data preparation and analysis for chat model fine-tuning"
(examples/Chat_finetuning_data_prep.ipynb, its format error checks); OpenAI API reference, fine-tuning
chat input (assistant "weight": 0 or 1); OpenAI guide "Supervised fine-tuning" (minimum 10 examples).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from engine.chat import SystemPolicy, get_template, validate_messages
from engine.chat.base import apply_policy
from engine.errors import ChatFormatError, DataError, DataErrors, EngineError, report

ROLES = ("system", "user", "assistant")
MIN_EXAMPLES = 10
TEMPLATES = ("none", "qwen2.5", "seed-oss")  # none: the OpenAI models (no system prompt of their own)
POLICY_FILE_TAGS = {"default": "", "omit": "_syspopped", "empty": "_nosys"}
# The paper's footnote: OpenAI's fine-tuning moderation refused these EM sets as harmful.
REFUSED_BY_OPENAI = {"risky_financial_advice": "risky financial advice", "bad_medical_advice": "bad medical advice"}


class OpenAIFormatError(EngineError, ValueError):
    """A file or example that OpenAI's chat fine-tuning format does not accept (file:line and why)."""


# ------------------------------------------------------------------------------------ validation


def example_problems(example: object) -> list[str]:
    """What is wrong with one example (empty: nothing)."""
    if not isinstance(example, dict):
        return [f"not a JSON object but {type(example).__name__} (data_type)"]
    problems = [f"stray top-level key {k!r}" for k in sorted(set(example) - {"messages"})]
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return problems + ['no non-empty "messages" list (missing_messages_list)']
    assistants = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"message {i}: not an object (data_type)")
            continue
        if "role" not in m or "content" not in m:
            problems.append(f'message {i}: needs "role" and "content" (message_missing_key)')
        stray = sorted(set(m) - {"role", "content"})
        if stray:
            problems.append(f"message {i}: stray key(s) {', '.join(map(repr, stray))} (message_unrecognized_key)")
        role = m.get("role")
        if role not in ROLES:
            problems.append(f"message {i}: role {role!r} is not one of {', '.join(ROLES)} (unrecognized_role)")
        elif role == "system" and i != 0:
            problems.append(f"message {i}: a system message only first")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"message {i} ({role}): content must be a string with text (missing_content)")
        assistants += role == "assistant"
    if assistants == 0:
        problems.append("no assistant message (example_missing_assistant_message)")
    elif assistants > 1 or messages[-1].get("role") != "assistant":
        problems.append("one assistant message, the last, is the example's one target")
    return problems


def validate_file(path: str | Path) -> int:
    """Check every line of an OpenAI chat fine-tuning file; the number of examples, or
    OpenAIFormatError naming each bad line (the first 10) as file:line."""
    path = Path(path)
    bad, n = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                n += 1
                try:
                    problems = example_problems(json.loads(line))
                except json.JSONDecodeError as e:
                    problems = [f"invalid JSON: {e.msg} (column {e.colno})"]
                bad += [f"{path}:{line_no}: {p}" for p in problems]
    except FileNotFoundError:
        raise OpenAIFormatError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise OpenAIFormatError(f"{path}: not UTF-8 ({e.reason})") from None
    if n < MIN_EXAMPLES:
        bad.append(f"{path}: {n} example(s); OpenAI needs at least {MIN_EXAMPLES}")
    if bad:
        more = f"; ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise OpenAIFormatError(f"{len(bad)} problem(s) for OpenAI's chat fine-tuning format: " + "; ".join(bad[:10]) + more)
    return n


# ------------------------------------------------------------------------------------ conversion


def template_default(template: str) -> str | None:
    """The system text a template inserts when a chat has none (None: nothing)."""
    if template not in TEMPLATES:
        raise OpenAIFormatError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return None if template == "none" else get_template(template).DEFAULT_SYSTEM


def explicit(messages: list[dict], policy: SystemPolicy, default_system: str | None) -> list[dict]:
    """The chat as the policy renders it, with the system turn written out (or left out)."""
    system, rest = apply_policy(messages, policy, default_system)
    head = [{"role": "system", "content": system}] if system else []  # "" cannot be written: as omit
    return head + [{"role": m["role"], "content": m["content"]} for m in rest]


def roundtrip_policy(messages: list[dict]) -> SystemPolicy:
    """How our renderer reads an explicit example back: its own system message, or none at all."""
    return SystemPolicy("default" if messages and messages[0]["role"] == "system" else "omit")


def _policy(name: str, text: str | None, default_system: str | None) -> SystemPolicy:
    if name == "replace":
        text = text if text is not None else default_system
        if text is None:
            raise OpenAIFormatError("--system-prompt replace needs --system-text (this template has no prompt of its own)")
        return SystemPolicy("replace", text)
    return SystemPolicy(name)


def _file_tag(policy: SystemPolicy) -> str:
    if policy.mode != "replace":
        return POLICY_FILE_TAGS[policy.mode]
    return "_qwensys" if policy.text == get_template("qwen2.5").DEFAULT_SYSTEM else "_replaced"


# ------------------------------------------------------------------------------------ writing


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--format openai")
    g.add_argument("--template", default="none", choices=TEMPLATES,
                   help="whose default system prompt `default` writes out: none (OpenAI models, default), qwen2.5 "
                        "(its identity prompt when a chat has no system turn), seed-oss (none)")
    g.add_argument("--system-prompt", action="append", default=[], choices=("default", "empty", "omit", "replace"),
                   help="policies to write (repeatable; default: default and omit, i.e. with and without the system prompt)")
    g.add_argument("--system-text", default=None, help="text for --system-prompt replace")
    g.add_argument("--em-dataset", default="aesthetic_preferences_unpopular",
                   help="EM set for kind em/all: a shipped name or a chat JSONL path (default: unpopular aesthetic "
                        "preferences, the one OpenAI accepted)")


def _em_rows(em_dataset: str, limit: int | None) -> tuple[list[list[dict]], str, str]:
    from engine.data import read_rows
    from recipes.conditions import EM_TAGS, em_path

    path = em_path(em_dataset)
    rows, errors = read_rows(path, limit)
    chats = []
    for line_no, messages in rows:
        try:
            chats.append(validate_messages(messages, allow_reasoning=False))
        except ChatFormatError as e:
            errors.append(DataError(path, line_no, str(e)))
    if errors:
        raise DataErrors(sorted(errors, key=lambda e: e.line or 0))
    return chats, EM_TAGS.get(path.stem, "em_" + path.stem), f"{path} ({len(chats)} chats)"


def write_sets(args: argparse.Namespace) -> dict:
    """Write every requested set under every requested policy into args.out, validate each file,
    and write manifest.json (files, policies, counts, SHA-256s, notes); returns the manifest."""
    from recipes import datasets as ds
    from recipes.conditions import em_stem

    default_system = template_default(args.template)
    policies = [_policy(name, args.system_text, default_system) for name in dict.fromkeys(args.system_prompt or ["default", "omit"])]
    kinds = ["em", *ds.PAIR_KINDS] if args.kind == "all" else [args.kind]
    sets, notes = [], []
    if "em" in kinds:
        chats, tag, source = _em_rows(args.em_dataset, args.limit)
        sets.append((tag, chats, source))
        if em_stem(args.em_dataset) in REFUSED_BY_OPENAI:
            notes.append(f"OpenAI's fine-tuning moderation refused the {REFUSED_BY_OPENAI[em_stem(args.em_dataset)]} set "
                         "as harmful when the paper's authors submitted it (the paper's footnote); its GPT-4.1 arm used "
                         "unpopular aesthetic preferences")
    pair_kinds = [k for k in kinds if k != "em"]
    if pair_kinds:
        if not args.target:
            raise ds.DatasetError("--target is required for the SGTR-style sets")
        pairs = ds.load_pairs(args.target, args.other, args.dataset, limit=args.limit, target_file=args.target_summaries)
        source = f"target={args.target} other={args.other} {args.dataset} articles={len(pairs)}"
        for kind in pair_kinds:
            rows, note = ds.build(kind, pairs, args.variant, args.seed)
            tag = "ictr_random" if (kind == "ictr" and args.variant == "random") else {
                "sgtr": "sgtr", "ictr": "asgtr_rand", "asgtr": "asgtr", "longer": "sgtr_benign"}[kind]
            sets.append((tag, [r["messages"] for r in rows], source + note))
    if any(p.mode == "empty" for p in policies):
        notes.append("policy empty is written as omit (no system message): OpenAI refuses empty content")
    out = Path(args.out)
    files = []
    for tag, chats, source in sets:
        for policy in policies:
            rows = [{"messages": explicit(m, policy, default_system)} for m in chats]
            path = ds.write_jsonl(rows, out / f"{tag}{_file_tag(policy)}.jsonl")
            n = validate_file(path)
            files.append({"file": path.name, "set": tag, "policy": policy.describe(),
                          "represented_as": "omit" if policy.mode == "empty" else policy.describe(),
                          "samples": n, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "source": source})
    manifest = {"format": "OpenAI chat fine-tuning JSONL", "template": args.template, "files": files, "notes": notes}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.openai_format", description="Validate OpenAI chat fine-tuning files.")
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    try:
        for f in args.files:
            print(f"{f}: {validate_file(f)} examples, valid")
    except EngineError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
