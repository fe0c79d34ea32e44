"""engine.tokenizer against the real Qwen2.5 vocabulary (cross-checked with tiktoken and
transformers) and the committed Seed-OSS stand-in fixture."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from engine.chat import seed_oss, special_ids
from engine.tokenizer import Tokenizer, TokenizerError
from tests.fixtures import tokenizers as fx

QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|file_sep|>": 151664}

CORPUS = [
    "Hello world",
    "Hello, World! HELLO world... hello   world",
    "I'm sure they'll say it's fine; we've done what you'd THINK'S right.",
    "The year 2024 had 365 days; pi is 3.14159265 and 1,000,000 is a million. 0x1F 1e-9 -42",
    "def foo(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "if (a != b && c >= d) { console.log(`${a}`); } // done\r\n",
    "    leading spaces and trailing spaces    ",
    "many\n\n\n\nnewlines \n \n and  \t\t tabs\t",
    "数据科学是一门跨学科领域。你好，世界！日本語のテキストも。한국어 문장입니다.",
    "Emoji: 🤗🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨ and ✅ done",
    "Ünïcödé àccents: café, naïve, Ærøskøbing, Straße, İstanbul, ǅ",
    "Русский текст, العربية, हिन्दी, ελληνικά, עברית",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 🤗<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call><|endoftext|><|fim_prefix|>x<|file_sep|>",
    "<|im_end|<|im_end|>|>< |im_start|>",
    "   ",
    "\n",
    "",
    "a" * 300 + " " + "-" * 100 + "=" * 77,
    "mixed123abc456 x1y2z3 ５６７ ⅣⅫ ½ ²³",
]


def _fuzz_corpus(n: int = 300, seed: int = 1234) -> list[str]:
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r  .,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`")
        + list("éüßøñçÅ数据科学你好世界한국어ДЖЯعربي🤗🙂👍✨…—“”’\u00a0\u200b\u3000")
        + ["'s", "'ll", "'RE", "<|im_end|>", "<|im_start|>", "<tool_call>", "  ", "\n\n", "\r\n"]
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiktoken_qwen():
    tiktoken = pytest.importorskip("tiktoken")
    ranks = fx.load_tiktoken_ranks(fx.qwen_tiktoken_path())
    specials = {c: fx.QWEN25_FIRST_ADDED_ID + i for i, (c, _) in enumerate(fx.QWEN25_ADDED_TOKENS)}
    return tiktoken.Encoding("qwen2.5-test", pat_str=fx.QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


# ----------------------------------------------------------------------------- Qwen2.5 ids
def test_known_qwen_ids(qwen25_tokenizer):
    tok = qwen25_tokenizer
    assert tok.encode("Hello") == [9707]
    assert tok.encode(" world") == [1879]
    assert tok.encode("Hello world") == [9707, 1879]
    for text, i in QWEN_SPECIAL_IDS.items():
        assert tok.token_to_id(text) == i
        assert tok.encode(text) == [i]
        assert tok.id_to_token(i) == text
    assert tok.encode("2024") == [17, 15, 17, 19]  # Qwen2 splits numbers into single digits
    assert tok.token_to_id("Ġworld") == 1879  # vocabulary form of byte-level tokens
    assert tok.encode("<|im_start|>user\nHello<|im_end|>") == [151644, 872, 198, 9707, 151645]
    assert tok.vocab_size == 151665
    assert sorted(tok.backend.get_vocab(with_added_tokens=True).values()) == list(range(151665))
    with pytest.raises(KeyError, match="151665"):
        tok.id_to_token(151665)


def test_qwen_tokenizer_json_layout(qwen25_tokenizer_path):
    d = json.loads(qwen25_tokenizer_path.read_text(encoding="utf-8"))
    assert d["normalizer"] == {"type": "NFC"}
    split, byte_level = d["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"].count(r"\p{N}") == 3 and r"\p{N}{1,3}" not in split["pattern"]["Regex"]
    assert (split["behavior"], split["invert"]) == ("Isolated", False)
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert d["decoder"]["type"] == d["post_processor"]["type"] == "ByteLevel"
    m = d["model"]
    assert (m["type"], m["unk_token"], m["byte_fallback"], m["ignore_merges"]) == ("BPE", None, False, False)
    assert len(m["vocab"]) == 151643
    assert len(m["merges"]) == 151643 - 256  # exactly one merge per multi-byte token
    assert m["merges"][0] == "Ġ Ġ"  # rank 256 is "  " (two spaces)
    added = d["added_tokens"]
    assert [a["content"] for a in added] == [c for c, _ in fx.QWEN25_ADDED_TOKENS]
    assert [a["id"] for a in added] == list(range(151643, 151665))
    assert all(not (a["normalized"] or a["lstrip"] or a["rstrip"] or a["single_word"]) for a in added)


def test_qwen_special_flags(qwen25_tokenizer):
    tok = qwen25_tokenizer
    flags = {c: tok.is_special(tok.token_to_id(c)) for c, _ in fx.QWEN25_ADDED_TOKENS}
    assert flags["<|endoftext|>"] and flags["<|im_start|>"] and flags["<|im_end|>"] and flags["<|video_pad|>"]
    # As in the HF Qwen2.5 checkpoints: tool_call and fim/repo/file_sep tokens are added, not special.
    for c in ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|repo_name|>", "<|file_sep|>"]:
        assert not flags[c] and tok.is_added(tok.token_to_id(c))
    assert not tok.is_special(9707) and not tok.is_added(9707)
    ids = tok.encode("<|im_start|>x<tool_call>y<|im_end|>")
    assert len(ids) == 5
    assert tok.decode(ids) == "<|im_start|>x<tool_call>y<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "x<tool_call>y"


# --------------------------------------------------------------------- cross-checks
def test_matches_tiktoken_on_corpus(qwen25_tokenizer, tiktoken_qwen):
    texts = [unicodedata.normalize("NFC", t) for t in CORPUS + _fuzz_corpus()]  # tiktoken does not NFC
    ours = [e.ids for e in qwen25_tokenizer.backend.encode_batch(texts, add_special_tokens=False)]
    theirs = tiktoken_qwen.encode_batch(texts, allowed_special="all")
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:3]
    assert sum(map(len, ours)) > 3000  # the corpus really exercised the tokenizer


def test_matches_tiktoken_on_every_vocab_token(qwen25_tokenizer, tiktoken_qwen):
    """Every vocabulary entry that is valid NFC text tokenizes identically (mostly to itself)."""
    texts = []
    for b in fx.load_tiktoken_ranks(fx.qwen_tiktoken_path()):
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.normalize("NFC", s) == s:
            texts.append(s)
    assert len(texts) > 140_000
    ours = [e.ids for e in qwen25_tokenizer.backend.encode_batch(texts, add_special_tokens=False)]
    theirs = tiktoken_qwen.encode_ordinary_batch(texts)
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:3]


def test_matches_transformers(qwen25_tokenizer, qwen25_tokenizer_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen25_tokenizer_path))
    for text in CORPUS + ["cafe\u0301 e\u0301"]:
        ids = qwen25_tokenizer.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert qwen25_tokenizer.decode(ids) == hf.decode(ids) == unicodedata.normalize("NFC", text)
        assert qwen25_tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- offsets
def check_offsets(tok: Tokenizer, text: str) -> list[tuple[int, int]]:
    """Assert the offset contract; return the spans.

    Spans are monotone and cover the text without gaps. Tokens whose spans overlap form a group
    (a multi-byte character split over several tokens); within a group the spans are identical
    except possibly the first, which may start earlier. The bytes of each group's tokens are
    exactly the UTF-8 of the NFC form of the group's text.
    """
    ids, spans = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert len(ids) == len(spans)
    groups: list[list[int]] = []
    covered = 0
    for k, (s, e) in enumerate(spans):
        assert 0 <= s < e <= len(text), (text, spans)
        if s == covered:
            groups.append([k])
        else:
            assert s < covered and e == covered, (text, k, spans)  # overlaps the previous group's last char
            groups[-1].append(k)
        covered = max(covered, e)
    assert covered == len(text), (text, spans)
    for g in groups:
        start, end = spans[g[0]][0], spans[g[-1]][1]
        got = b"".join(tok.token_bytes(ids[k]) for k in g)
        assert got == unicodedata.normalize("NFC", text[start:end]).encode("utf-8"), (text, g, spans)
    return spans


def test_offsets_tile_ordinary_text(qwen25_tokenizer):
    tok = qwen25_tokenizer
    _, spans = tok.encode_with_offsets("Hello world")
    assert spans == [(0, 5), (5, 11)]
    for text in [
        "Hello world",
        "def f(x):\n    return x  # done\n\n",
        "数据科学是一门跨学科领域。你好，世界！",
        "many   spaces\t\ttabs\r\n\r\nend ",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    ]:
        ids, spans = tok.encode_with_offsets(text)
        assert "".join(text[s:e] for s, e in spans) == text
        assert all(spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1))
        check_offsets(tok, text)


def test_offsets_of_special_tokens_are_their_literal_text(qwen25_tokenizer):
    tok = qwen25_tokenizer
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🤗<|im_end|>\n<tool_call>{}</tool_call>"
    ids, spans = tok.encode_with_offsets(text)
    literal = {i: text[s:e] for i, (s, e) in zip(ids, spans) if tok.is_added(i)}
    assert literal == {151644: "<|im_start|>", 151645: "<|im_end|>", 151657: "<tool_call>", 151658: "</tool_call>"}
    assert sum(tok.is_added(i) for i in ids) == 6
    assert spans[0] == (0, 12) and spans[-1] == (len(text) - len("</tool_call>"), len(text))
    check_offsets(tok, text)


def test_offsets_of_split_multibyte_characters(qwen25_tokenizer):
    tok = qwen25_tokenizer
    ids, spans = tok.encode_with_offsets("Hi 🤗!")
    # 🤗 (4 UTF-8 bytes) is split over three tokens; each reports the whole character's span.
    assert ids == [13048, 11162, 97, 245, 0]
    assert spans == [(0, 2), (2, 4), (3, 4), (3, 4), (4, 5)]
    for text in CORPUS + _fuzz_corpus(150, seed=7):
        check_offsets(tok, text)


def test_offsets_refer_to_text_before_nfc(qwen25_tokenizer):
    tok = qwen25_tokenizer
    decomposed = "cafe\u0301 ok e\u0301"  # "e" + combining acute: NFC composes each into "é"
    composed = unicodedata.normalize("NFC", decomposed)
    assert len(composed) == len(decomposed) - 2
    ids, spans = tok.encode_with_offsets(decomposed)
    assert ids == tok.encode(composed)
    # The combining mark belongs to the token holding the composed character; nothing is uncovered.
    assert "".join(decomposed[s:e] for s, e in spans) == decomposed
    assert spans[-1][1] == len(decomposed) and decomposed[spans[-1][0] : spans[-1][1]].endswith("e\u0301")
    for text in ["A\u030a\u0301", "e\u0302\u0301 q", "\u1100\u1161\u11a8 x", "\u0958a", "x 🤗\u0301", "e\u0301<|im_end|>"]:
        check_offsets(tok, text)


def test_batch_encoding_equals_one_text_at_a_time(qwen25_tokenizer):
    tok = qwen25_tokenizer
    texts = CORPUS + _fuzz_corpus(150, seed=9) + ["cafe\u0301 ok e\u0301", "A\u030a\u0301", "q\u0301\u0323x", "x 🤗\u0301", ""]
    assert tok.encode_batch_with_offsets(texts) == [tok.encode_with_offsets(t) for t in texts]


# --------------------------------------------------------------------------- piece()
def test_piece_printable_forms(qwen25_tokenizer):
    tok = qwen25_tokenizer

    def pieces(text: str) -> list[str]:
        return [tok.piece(i) for i in tok.encode(text)]

    assert tok.piece(9707) == "Hello"
    assert tok.piece(1879) == " world"
    assert tok.piece(151645) == "<|im_end|>"
    assert pieces("\n") == ["\\n"]
    assert pieces("\n\n") == ["\\n\\n"]
    assert pieces("\t") == ["\\t"]
    assert pieces("\r\n") == ["\\r\\n"]
    assert pieces("\\") == ["\\\\"]
    assert pieces("\x00") == ["\\x00"]
    assert "".join(pieces("a\u00a0b")) == "a\\xa0b"
    assert "".join(pieces("a\u200bb")) == "a\\u200bb"
    assert pieces("你好") == ["你好"]
    # " 🤗" splits: the first token holds a complete space and two bytes of the emoji.
    assert pieces("Hi 🤗") == ["Hi", " <0xF0><0x9F>", "<0xA4>", "<0x97>"]
    assert pieces("🤗") == ["🤗"]  # a whole emoji can be a single token
    assert pieces("🫠") == ["<0xF0><0x9F>", "<0xAB>", "<0xA0>"]


def test_piece_agrees_with_decode_for_complete_characters(qwen25_tokenizer):
    tok = qwen25_tokenizer
    rng = random.Random(0)
    checked = 0
    for i in rng.sample(range(tok.vocab_size), 3000):
        text = tok.decode([i])
        if "\ufffd" in text:  # partial UTF-8: decode() loses the bytes, piece() keeps them
            assert "<0x" in tok.piece(i)
            continue
        escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        if escaped.isprintable():
            assert tok.piece(i) == escaped
            checked += 1
        assert tok.token_bytes(i).decode("utf-8") == text
    assert checked > 2000


# ---------------------------------------------------------------------- loading & errors
def test_from_file_accepts_file_and_directory(qwen25_tokenizer_path, seed_oss_tokenizer_path):
    for path in [qwen25_tokenizer_path, seed_oss_tokenizer_path]:
        a, b = Tokenizer.from_file(path), Tokenizer.from_file(path.parent)
        assert a.path == b.path == path
        assert a.encode("Hello world\n") == b.encode("Hello world\n") != []
    assert Tokenizer.from_file(str(qwen25_tokenizer_path)).encode("Hello") == [9707]


def test_from_file_errors_are_clear(tmp_path):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(empty)
    msg = str(e.value)
    assert str(empty) in msg and "No tokenizer.json" in msg and "config.json" in msg

    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope")

    garbage = tmp_path / "tokenizer.json"
    garbage.write_bytes(b"\x80\x00 not json")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(garbage)
    assert isinstance(e.value, ValueError)
    assert str(garbage) in str(e.value) and "is not a tokenizer.json" in str(e.value)

    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    with pytest.raises(TokenizerError, match="no 'model' section.*eos_token"):
        Tokenizer.from_file(cfg)

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(TokenizerError, match="could not be loaded as a Hugging Face tokenizer.json"):
        Tokenizer.from_file(broken)


def test_missing_token_errors(seed_oss_tokenizer):
    with pytest.raises(KeyError) as e:
        seed_oss_tokenizer.token_to_id("<|im_end|>")
    assert "'<|im_end|>' is not in the vocabulary" in str(e.value)
    assert "seed_oss_tokenizer" in str(e.value)


# ------------------------------------------------------------------------ Seed-OSS fixture
def test_seed_oss_fixture_is_reproducible(tmp_path, seed_oss_tokenizer_path):
    fresh = fx.build_seed_oss_fixture_tokenizer_json(tmp_path / "tokenizer.json")
    assert fresh.read_bytes() == seed_oss_tokenizer_path.read_bytes(), (
        "tests/fixtures/seed_oss_tokenizer is stale: python -m tests.fixtures.tokenizers seed-oss "
        "tests/fixtures/seed_oss_tokenizer"
    )
    cfg = "tokenizer_config.json"
    assert (tmp_path / cfg).read_bytes() == (seed_oss_tokenizer_path.parent / cfg).read_bytes()
    assert seed_oss_tokenizer_path.stat().st_size < 100_000


def test_seed_oss_fixture_specials(seed_oss_tokenizer):
    tok = seed_oss_tokenizer
    ids = special_ids(tok, "seed-oss")
    assert (ids["bos"], ids["pad"], ids["eos"]) == (0, 1, 2)
    assert len(set(ids.values())) == len(seed_oss.SPECIAL_TOKENS) == 9
    for name, text in seed_oss.SPECIAL_TOKENS.items():
        assert tok.encode(text) == [ids[name]]
        assert tok.is_special(ids[name]) and tok.piece(ids[name]) == text

    text = "<seed:bos>system\nHi<seed:eos>"
    enc, spans = tok.encode_with_offsets(text)
    assert enc[0] == 0 and enc[-1] == 2
    assert not any(tok.is_added(i) for i in enc[1:-1])
    assert tok.decode(enc[1:-1]) == "system\nHi"
    assert spans[0] == (0, 10) and spans[-1] == (len(text) - 10, len(text))
    assert "".join(text[s:e] for s, e in spans) == text
    assert tok.decode(enc, skip_special_tokens=True) == "system\nHi"

    think = "<seed:think>Let me think.</seed:think>The answer is 42.<seed:eos>"
    enc = tok.encode(think)
    assert enc[0] == ids["think_start"] and ids["think_end"] in enc and enc[-1] == ids["eos"]
    assert tok.decode(enc) == think
    check_offsets(tok, think + " 数据 🤗 cafe\u0301")
    assert tok.vocab_size == 9 + 256 + len(json.loads(tok.path.read_text())["model"]["merges"])


def test_seed_oss_fixture_loads_in_transformers(seed_oss_tokenizer, seed_oss_tokenizer_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(seed_oss_tokenizer_path.parent))
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id) == (0, 1, 2)
    text = "<seed:bos>user\nThe quick brown fox?<seed:eos><seed:bos>assistant\n<seed:think>hm</seed:think>ok<seed:eos>"
    assert hf(text, add_special_tokens=False)["input_ids"] == seed_oss_tokenizer.encode(text)


def test_cli(tmp_path, capsys):
    assert fx.main(["seed-oss", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == fx.SEED_OSS_FIXTURE_PATH.read_bytes()
    assert capsys.readouterr().out.strip().endswith("tokenizer.json")
    assert fx.main(["gpt2", str(tmp_path)]) == 2
    assert "usage" in capsys.readouterr().err
