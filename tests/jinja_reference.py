"""The official chat templates rendered with jinja2 the way transformers renders them.

Golden reference for the renderer tests only (jinja2 is a test dependency, never used by engine
code). Template sources, vendored verbatim in tests/templates/:
  qwen2.5-instruct.jinja       chat_template of Qwen/Qwen2.5-*-Instruct tokenizer_config.json
  seed-oss-36b-instruct.jinja  chat_template.jinja of ByteDance-Seed/Seed-OSS-36B-Instruct
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_FILES = {"qwen2.5": "qwen2.5-instruct.jinja", "seed-oss": "seed-oss-36b-instruct.jinja"}


@lru_cache(maxsize=None)
def _compiled(name: str):
    # transformers' settings: trim_blocks, lstrip_blocks, loopcontrols, a json `tojson`.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    return env.from_string((TEMPLATE_DIR / TEMPLATE_FILES[name]).read_text(encoding="utf-8"))


def render_reference(name: str, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    return _compiled(name).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
