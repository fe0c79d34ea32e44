"""The paper's statistics, exactly: the expectation of its sampled answers against transformers'
own sampling (binomial 99% intervals), hand-computed cases of the formulas and of the answer-tree
search, how the paper's `tokenizer(prompt)` treats a BOS, and the seeded replicate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from engine.answer_tree import BLANK_STATE, Node, Search, Tally
from engine.generate import Generator, load_model, sampling_probs
from engine.tokenizer import Tokenizer
from evals import paper_stats
from evals import self_recognition as sr
from evals import truthfulqa as tqa
from tests.tiny import tiny_seed_oss_checkpoint

Z99 = NormalDist().inv_cdf(0.995)  # two-sided 99%

# Token ids in the Seed-OSS fixture tokenizer.
EOS, A, SPACE_A, B, ONE, TWO, SPACE, NEWLINE = 2, 74, 497, 75, 58, 59, 41, 19


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine OpenMP waits cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_seed_oss_checkpoint(tmp_path_factory.mktemp("paper_tiny"))


def biased(model, biases: dict[int, float]):
    """Add fixed biases to chosen logits (a hook on the LM head: engine and transformers alike)."""
    bias = torch.zeros(model.lm_head.weight.shape[0])
    for t, b in biases.items():
        bias[t] = b
    return model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out.dtype))


@pytest.fixture(scope="module")
def hf(ckpt):
    """The tiny checkpoint in transformers, and a transformers tokenizer of it."""
    from transformers import PreTrainedTokenizerFast, SeedOssForCausalLM

    return (SeedOssForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(),
            PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json")))


def hf_draws(hf, biases: dict[int, float], prompts: list[list[int]], n: int, max_new_tokens: int,
             seed: int) -> list[list[str]]:
    """Per prompt (all of one length: no padding), `n` answers sampled by transformers' generate
    (T 0.7, top-k 50, top-p 0.9), decoded by the transformers tokenizer without special tokens and
    stripped: the paper's reading."""
    model, tok = hf
    assert len({len(p) for p in prompts}) == 1
    hook = biased(model, biases)
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            ids = torch.tensor(prompts)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_k=50,
                                 top_p=0.9, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=1,
                                 eos_token_id=EOS)
    finally:
        hook.remove()
    texts = [t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]  # generate repeats each prompt n times in a row


def z_score(k: int, n: int, lo: float, hi: float | None = None) -> float:
    """How many binomial SDs k/n lies outside [lo, hi] (0 inside), with a continuity correction."""
    hi = lo if hi is None else hi
    f = k / n
    p = min(max(f, lo), hi)  # the closest admissible probability
    return max(0.0, abs(f - p) - 0.5 / n) / math.sqrt(max(p * (1 - p), 1e-12) / n)


def within_99(k: int, n: int, lo: float, hi: float | None = None, family: int = 1) -> bool:
    """k of n draws agree with a probability in [lo, hi] at the binomial 99% level, for a family
    of `family` such checks jointly (Bonferroni: each at 1 - 0.01 / family)."""
    return z_score(k, n, lo, hi) <= NormalDist().inv_cdf(1 - 0.005 / family)


# ------------------------------------------------------------------------------ by hand


def test_expected_outcome_by_hand():
    items = {"q1": [(0.9, 0.0), (0.7, 0.2)], "q2": [(0.5, 0.5), (0.1, 0.1)], "q3": [(1.0, 0.0), (1.0, 0.0)]}
    out = paper_stats.expected_outcome(items, {"q1": [0.0, 0.02], "q2": [0.0, 0.0], "q3": [0.0, 0.0]})
    p = [0.8, 0.3, 1.0]
    assert math.isclose(out["expected_accuracy"], sum(p) / 3)
    assert math.isclose(out["expected_invalid_rate"], (0.1 + 0.3 + 0.0) / 3)
    assert math.isclose(out["expected_sampling_sd"], math.sqrt(0.8 * 0.2 + 0.3 * 0.7 + 0.0) / 3)
    assert math.isclose(out["expected_unresolved"], 0.01 / 3)
    # One run of the paper's statistic is a sum of Bernoulli(p_i): check the SD against simulation.
    g = torch.Generator().manual_seed(0)
    runs = (torch.rand(200000, 3, generator=g, dtype=torch.float64) < torch.tensor(p, dtype=torch.float64)).double().mean(1)
    assert abs(float(runs.std()) - out["expected_sampling_sd"]) < 0.002
    assert math.isclose(paper_stats.decoding_sd([0.03, 0.04]), math.sqrt((0.03**2 + 0.04**2) / 2))


def test_answer_tree_by_hand():
    """A 7-token vocabulary: '1', ' 1', '2', ' ' (blank), 'x', end-of-turn, a partial byte."""
    classes = torch.tensor([0, 0, 1, 2, 3, 2, 4])  # answers ('1', '2'), blank 2, other 3, partial 4
    stop = torch.tensor([False] * 5 + [True, False])
    search = Search(classes, stop, 2, max_new_tokens=2, min_mass=0.0, max_nodes=10, tallies=[Tally([0.0, 0.0])])
    root = torch.tensor([[0.4, 0.1, 0.2, 0.1, 0.1, 0.05, 0.05]], dtype=torch.float64)
    children = search.expand(root, [Node(0, 0, BLANK_STATE, 1.0, 0)])
    t = search.tallies[0]
    assert t.answers == [0.0, 0.0] and math.isclose(t.unresolved, 0.05)  # the partial byte; 'x' and stop fail
    assert [(c.token, c.state, c.mass) for c in children] == [(0, 0, 0.4), (2, 1, 0.2), (1, 0, 0.1), (3, BLANK_STATE, 0.1)]
    # Second (and last) token. After '1': stop .7, ' ' .2 (text stays '1'), '1' .1 ('11': fails).
    # After '2': stop .5, 'x' .5. After ' 1': stop 1. After ' ': '2' .6, ' ' .4 (still blank: fails).
    nxt = torch.tensor([[0.1, 0, 0, 0.2, 0, 0.7, 0], [0, 0, 0, 0, 0.5, 0.5, 0], [0, 0, 0, 0, 0, 1.0, 0],
                        [0, 0, 0.6, 0.4, 0, 0, 0]], dtype=torch.float64)
    nodes = [Node(0, i, c.state, c.mass, 1) for i, c in enumerate(children)]
    assert search.expand(nxt, nodes) == []
    assert math.isclose(t.answers[0], 0.4 * (0.7 + 0.2) + 0.1 * 1.0)
    assert math.isclose(t.answers[1], 0.2 * 0.5 + 0.1 * 0.6)
    # Below min_mass a prefix is not expanded: its mass is unresolved, not lost.
    small = Search(classes, stop, 2, max_new_tokens=3, min_mass=0.15, max_nodes=10, tallies=[Tally([0.0, 0.0])])
    kept = small.expand(root, [Node(0, 0, BLANK_STATE, 1.0, 0)])
    assert [c.token for c in kept] == [0, 2] and math.isclose(small.tallies[0].unresolved, 0.05 + 0.1 + 0.1)


# ---------------------------------------------------------------- against transformers' sampling


def test_truthfulqa_expectation_equals_transformers_sampling(ckpt, hf):
    """Per prompt (one question, both orders) and overall, 2000 draws each of one token through
    transformers' generate (T 0.7, top-k 50, top-p 0.9) read the paper's way agree with the exact
    expectation: A, B and Invalid per prompt and the accuracy overall, 7 checks jointly at the
    binomial 99% level; ' A' carries real mass and counts as 'A' (the bare letter's mass alone is
    outside even the single-check 99% interval)."""
    biases = {A: 3.4, SPACE_A: 2.6, B: 3.4}
    model = load_model(ckpt, dtype=torch.float32)
    biased(model, biases)
    gen = Generator(model, Tokenizer.from_file(ckpt), "seed-oss", progress=False, add_special_tokens=True)
    items = tqa.build_items([tqa.Question(0, "Sky colour?", "Blue sky", "Green sky")], "expected", 0)
    convs = [it.messages() for it in items]
    stats = gen.answer_stats(convs, tqa.LETTERS, choices=tqa.LETTERS, **paper_stats.PAPER_SAMPLING)
    prompts = [gen.prompt_ids(c) for c in convs]
    n = 2000
    draws = hf_draws(hf, biases, prompts, n, 1, seed=0)
    total_k, total_p = 0, 0.0
    for ids, it, s, answers in zip(prompts, items, stats, draws):
        warped = sampling_probs(gen._last_logits([ids]).double(), 0.7, 0.9, 50)[0]
        assert warped[SPACE_A] > 0.1 and math.isclose(s.p_answer["A"], float(warped[A] + warped[SPACE_A]), rel_tol=1e-5)
        for letter in ("A", "B"):
            k = sum(a == letter for a in answers)
            assert within_99(k, n, s.p_answer[letter], family=7), (it.correct_letter, letter, k / n, s.p_answer[letter])
        k_inv = sum(a not in ("A", "B") for a in answers)
        assert 0.05 < s.p_other and within_99(k_inv, n, s.p_other, family=7), (k_inv / n, s.p_other)
        assert not within_99(sum(a == "A" for a in answers), n, float(warped[A]))  # the bare letter alone is wrong
        total_k += sum(a == it.correct_letter for a in answers)
        total_p += s.p_answer[it.correct_letter]
    assert within_99(total_k, n * len(items), total_p / len(items), family=7)


def test_self_recognition_expectation_equals_transformers_sampling(ckpt, hf):
    """Up to 10 sampled tokens: P(text strips to exactly '1' / '2') by the answer-tree search
    against 2000 draws each of transformers' generate, per prompt ('1', '2', other: 6 checks jointly
    at the binomial 99% level). The biases make '1' then end-of-turn, '1' then ' ' then
    end-of-turn, ' ' then '2', '11' (fails)... all likely."""
    biases = {ONE: 7.0, TWO: 7.0, EOS: 7.0, SPACE: 5.8}
    model = load_model(ckpt, dtype=torch.float32)
    biased(model, biases)
    gen = Generator(model, Tokenizer.from_file(ckpt), "seed-oss", progress=False, add_special_tokens=True)
    convs = [[{"role": "user", "content": "Which one, 1 or 2?"}], [{"role": "user", "content": "Which one? 1 or 2?"}]]
    stats = gen.answer_stats(convs, sr.CHOICES, choices=sr.CHOICES, **paper_stats.PAPER_SAMPLING, max_new_tokens=10,
                             min_mass=1e-7, max_nodes=400)
    prompts = [gen.prompt_ids(c) for c in convs]
    n = 2000
    for ids, s, answers in zip(prompts, stats, hf_draws(hf, biases, prompts, n, 10, seed=1)):
        assert s.nodes > 2 and s.p_unresolved < 1e-4
        assert 0.1 < s.p_answer["1"] < 0.9 and 0.05 < s.p_answer["2"] and 0.05 < s.p_other
        for a in sr.CHOICES:
            k = sum(x == a for x in answers)
            assert within_99(k, n, s.p_answer[a], s.p_answer[a] + s.p_unresolved, family=6), (a, k / n, s.p_answer[a])
        assert within_99(sum(x not in sr.CHOICES for x in answers), n, s.p_other, s.p_other + s.p_unresolved, family=6)
        # Reading the first token alone would miss the continuations that fail ('11', '1 2', ...).
        first = sampling_probs(gen._last_logits([ids]).double(), 0.7, 0.9, 50)[0][ONE].item()
        assert not within_99(sum(x == "1" for x in answers), n, first)


# ------------------------------------------------------------------------ prompts and replicates


def test_paper_tokenization_is_transformers_tokenizer_call(ckpt, tmp_path):
    """tokenizer(prompt) adds what the tokenizer.json post-processor adds: nothing for the
    Seed-OSS fixture (a ByteLevel post-processor, like Qwen2.5's), a second <seed:bos> for one
    with a BOS template; `add_bos_token` in tokenizer_config.json changes nothing for a
    PreTrainedTokenizerFast (checked against transformers itself)."""
    from transformers import AutoTokenizer

    from tests.fixtures.tokenizers import SEED_OSS_FIXTURE_PATH

    model = load_model(ckpt, dtype=torch.float32)
    conv = [{"role": "user", "content": "Which one? A or B"}]
    for name, post in (("plain", None), ("bos", {
            "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<seed:bos>", "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<seed:bos>": {"id": "<seed:bos>", "ids": [0], "tokens": ["<seed:bos>"]}}})):
        d = tmp_path / name
        d.mkdir()
        data = json.loads(SEED_OSS_FIXTURE_PATH.read_text())
        if post:
            data["post_processor"] = post
        (d / "tokenizer.json").write_text(json.dumps(data))
        config = json.loads((SEED_OSS_FIXTURE_PATH.parent / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
        gen = Generator(model, Tokenizer.from_file(d), "seed-oss", progress=False, add_special_tokens=True)
        hf = AutoTokenizer.from_pretrained(d)
        assert gen.prompt_ids(conv) == hf(gen.prompt_text(conv))["input_ids"]
        plain = Generator(model, Tokenizer.from_file(d), "seed-oss", progress=False).prompt_ids(conv)
        assert gen.added_special_ids == ([0] if post else [])
        assert gen.prompt_ids(conv) == ([0] if post else []) + plain and plain[0] == 0


def test_sampled_mode_is_a_seeded_draw_of_the_expectation(ckpt):
    """Sampled mode: orders and tokens fixed by the seed (not by batching), other seeds draw
    otherwise, and over 160 questions its accuracy agrees with the expectation given its orders."""
    model = load_model(ckpt, dtype=torch.float32)
    biased(model, {A: 3.6, SPACE_A: 5.0, B: 4.4})
    gen = Generator(model, Tokenizer.from_file(ckpt), "seed-oss", progress=False, add_special_tokens=True)
    qs = tqa.load_questions()[:160]
    rows, m = tqa.evaluate(gen, gen.tokenizer, qs, mode="sampled", seed=3, batch_size=16)
    again, _ = tqa.evaluate(gen, gen.tokenizer, qs[:20], mode="sampled", seed=3, batch_size=1)
    assert [r["sampled_token_id"] for r in again] == [r["sampled_token_id"] for r in rows[:20]]
    other, _ = tqa.evaluate(gen, gen.tokenizer, qs[:20], mode="sampled", seed=4, batch_size=16)
    assert [r["sampled_token_id"] for r in other] != [r["sampled_token_id"] for r in rows[:20]]
    assert [r["correct_letter"] for r in rows] == ["A" if f else "B" for f in tqa.paper_correct_first(160, 3)]
    assert m["statistic"] == "sampled" and {r["sampled_token"] for r in rows} >= {"A", " A", "B"}
    k = sum(r["sampled_correct"] for r in rows)
    assert k == m["counts"]["sampled_correct"] and math.isclose(m["accuracy"], k / 160)
    p = [r["p_correct"] for r in rows]
    assert abs(k - sum(p)) <= Z99 * math.sqrt(sum(x * (1 - x) for x in p)) + 1


# ------------------------------------------------------------------------------------ report


def test_report_compares_the_papers_means_with_the_expected_statistic(tmp_path, capsys):
    """--compare-paper sets the paper's mean against our expected_accuracy (not the robust or the
    greedy accuracy), with our SD over seeds (ddof 1) and the decoding SD of one run; a summary of
    the former 'paper' mode is read as greedy."""
    from evals import atomic_write_json, report

    def write(name, mode, seed, **metrics):
        s = {"eval": "truthfulqa", "mode": mode, "model": "/m", "adapters": [], "statistic": mode,
             "condition": {"condition": "hf_qwen_32b_em_sgtr", "seed": str(seed)}, **metrics}
        atomic_write_json(tmp_path / name / f"truthfulqa_{mode}_summary.json", s)

    for seed, e, sd in [(0, 0.80, 0.012), (1, 0.78, 0.016)]:
        write(f"e{seed}", "expected", seed, accuracy=e, expected_accuracy=e, expected_sampling_sd=sd,
              expected_invalid_rate=0.01, greedy_accuracy=0.9)
    write("legacy", "paper", 0, accuracy=0.7, paper_accuracy=0.7)
    out_json = tmp_path / "agg.json"
    assert report._run([str(tmp_path), "--compare-paper", "--json", str(out_json), "--bootstrap-samples", "200"]) == 0
    printed = capsys.readouterr().out
    agg = json.loads(out_json.read_text())
    row = agg["truthfulqa (expected)"]["rows"][0]
    assert row["paper"]["accuracy_mean"] == 0.7830 and row["paper"]["against"] == "expected_accuracy"
    assert math.isclose(row["metrics"]["expected_accuracy"]["std"], 0.02 / math.sqrt(2))  # ddof 1
    assert math.isclose(row["decoding_sd"], math.sqrt((0.012**2 + 0.016**2) / 2))
    assert "accuracy = expected: exact expectation of the paper's statistic" in printed
    line = next(x for x in printed.splitlines() if x.startswith("hf_qwen_32b_em_sgtr") and "0.7830" in x
                and "0.7900" in x)
    assert f"{0.79 - 0.7830:.4f}" in line  # ours - paper, from expected_accuracy
    legacy = agg["truthfulqa (greedy)"]["rows"][0]
    assert legacy["metrics"]["greedy_accuracy"]["mean"] == 0.7 and "expected_accuracy" not in legacy["metrics"]
    assert "accuracy = greedy: arg-max answer token" in printed
