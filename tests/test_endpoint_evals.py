"""The evals through an OpenAI-compatible endpoint (evals.endpoint) against a server on 127.0.0.1
that answers from a tiny local model through the engine's own scoring (the rendered chat's
next-token distribution, its true top-20 log-probs): the endpoint numbers equal the local
computation truncated to the same 20 tokens, and their bounds hold the untruncated local values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.generate import Generator, load_model, sampling_probs
from engine.tokenizer import Tokenizer
from evals import endpoint as ep
from evals import self_recognition as sr
from evals import truthfulqa as tqa
from evals.endpoint_runs import run_self_recognition, run_truthfulqa
from evals.openai_client import EndpointRequestError, OpenAIClient
from evals.paper_stats import PAPER_SAMPLING
from tests.loopback import Loopback
from tests.tiny import tiny_seed_oss_checkpoint

N_QUESTIONS = 8
WARP = (PAPER_SAMPLING["temperature"], PAPER_SAMPLING["top_p"], PAPER_SAMPLING["top_k"])


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A tiny Seed-OSS model whose logits are sharpened (x3) and pushed towards the answer tokens
    (A, B, " A", 1, 2...), so that the top 20 hold about half of the mass, the letters among them."""
    ckpt = tiny_seed_oss_checkpoint(tmp_path_factory.mktemp("endpoint_tiny"))
    model = load_model(ckpt, dtype=torch.float32)
    g = Generator(model, Tokenizer.from_file(ckpt), "seed-oss", thinking_budget=0, progress=False)
    bias = torch.zeros(model.args.vocab_size)
    for text, b in (("A", 6.0), ("B", 5.5), (" A", 4.0), ("1", 6.0), ("2", 5.7)):
        ids = g.tokenizer.encode(text)
        if len(ids) == 1:
            bias[ids[0]] = b
    model.lm_head.register_forward_hook(lambda mod, inp, out: out * 3.0 + bias.to(out.dtype))
    return g


@torch.inference_mode()
def full_logits(gen, messages) -> torch.Tensor:
    return gen._last_logits([gen.prompt_ids(messages)])[0].double()


def serve(gen):
    """The server: the chat rendered by the engine, its top-20 raw log-probs (float64), token
    texts as a server decodes single tokens; without `logprobs`, one token sampled with the
    request's temperature, top_p, top_k and seed."""

    def reply(request):
        _, _, body = request
        logits = full_logits(gen, body["messages"])
        if not body.get("logprobs"):
            probs = sampling_probs(logits[None], body["temperature"], body.get("top_p", 1.0), body.get("top_k"))[0]
            token = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(body["seed"])))
            return 200, _completion(gen.tokenizer.decode([token]), [])
        lp = torch.log_softmax(logits, dim=-1)
        values, ids = lp.topk(body["top_logprobs"])
        top = [(gen.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
        return 200, _completion(top[0][0], top)

    return Loopback(reply)


def _completion(text: str, top: list[tuple[str, float]]) -> dict:
    content = [{"token": text, "logprob": top[0][1] if top else 0.0,
                "top_logprobs": [{"token": t, "logprob": x} for t, x in top]}]
    return {"model": "tiny-local", "choices": [{"index": 0, "finish_reason": "length",
                                                "message": {"role": "assistant", "content": text},
                                                "logprobs": {"content": content} if top else None}]}


def truncated_local(gen, messages, answers) -> tuple[dict, float]:
    """The local computation on the top 20 only: every other logit set to -inf, then the engine's
    own warpers (sampling_probs) and its token classes. ({answer: p}, raw top-20 mass)."""
    logits = full_logits(gen, messages)
    top = torch.log_softmax(logits, -1).topk(20)
    masked = torch.full_like(logits, -math.inf)
    masked[top.indices] = logits[top.indices]
    probs = sampling_probs(masked[None], *WARP)[0]
    classes = gen.answer_classes(tuple(answers))
    return {a: float(probs[classes == k].sum()) for k, a in enumerate(answers)}, float(top.values.exp().sum())


def client(server) -> OpenAIClient:
    return OpenAIClient(server.url, api_key_env="SGTR_TEST_KEY", max_retries=0)


def test_truthfulqa_expected_equals_local_top20_and_bounds_hold(gen, tmp_path):
    questions = tqa.load_questions()[:N_QUESTIONS]
    # One prompt per forward pass, as the server runs them: the same float32 logits, bit for bit.
    local_rows, local = tqa.evaluate(gen, gen.tokenizer, questions, mode="expected", seed=0, batch_size=1)
    with serve(gen) as server:
        s = run_truthfulqa(client(server), "tiny-local", tmp_path, mode="expected", limit=N_QUESTIONS,
                           data=tqa.DEFAULT_CSV, log=lambda m: None)
    rows = list(_csv(tmp_path / "truthfulqa_expected_results.csv"))
    assert len(rows) == len(local_rows) == 2 * N_QUESTIONS
    masses, wants = [], []
    for r, lr, it in zip(rows, local_rows, tqa.build_items(questions, "expected", 0)):
        assert (int(r["question_index"]), r["correct_letter"]) == (lr["question_index"], lr["correct_letter"])
        want, mass = truncated_local(gen, it.messages(), tqa.LETTERS)
        masses.append(mass)
        wants.append(want[it.correct_letter])
        assert float(r["p_correct"]) == pytest.approx(want[it.correct_letter], abs=1e-12)
        assert float(r["p_invalid"]) == pytest.approx(1 - sum(want.values()), abs=1e-12)
        # The untruncated local value lies within the bounds over every consistent tail.
        assert float(r["p_correct_lo"]) - 1e-12 <= lr["p_correct"] <= float(r["p_correct_hi"]) + 1e-12
        assert float(r["p_invalid_lo"]) - 1e-12 <= lr["p_invalid"] <= float(r["p_invalid_hi"]) + 1e-12
        assert float(r["top_mass"]) == pytest.approx(mass, abs=1e-12)
        # The decisions from the top 20 are the local ones, when a letter is among them.
        assert r["greedy_answer"] == lr["greedy_answer"]
        assert r["choice"] in ("", lr["choice"])
        if r["logprob_A"]:
            assert float(r["logprob_A"]) == pytest.approx(lr["logprob_A"], abs=1e-5)
    assert min(masses) < 1 - 1e-4  # the test has a tail to account for
    assert all(r["choice"] for r in rows)  # both letters among the top 20 here
    assert s["expected_accuracy"] == pytest.approx(sum(wants) / len(wants), abs=1e-12)  # both orders per question
    lo, hi = s["expected_accuracy_bounds"]
    assert lo - 1e-12 <= local["expected_accuracy"] <= hi + 1e-12 and lo <= s["expected_accuracy"] <= hi
    assert hi - lo > 1e-3 and abs(local["expected_accuracy"] - s["expected_accuracy"]) > 1e-4  # the tail matters
    assert s["accuracy"] == s["expected_accuracy"] and s["statistic"] == "expected_top20"
    assert s["statistic_note"] == "top-20 truncated" and s["top_logprobs"] == 20
    assert s["logprob_accuracy"] == pytest.approx(local["logprob_accuracy"])
    assert s["greedy_accuracy"] == pytest.approx(local["greedy_accuracy"])
    assert s["served_models"] == ["tiny-local"] and s["endpoint_model"] == "tiny-local"
    body = server.requests[0][2]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20


def test_resume_sends_only_missing_prompts_and_refuses_other_settings(gen, tmp_path):
    with serve(gen) as server:
        first = run_truthfulqa(client(server), "tiny-local", tmp_path, mode="robust", limit=3, data=tqa.DEFAULT_CSV,
                               log=lambda m: None)
        log_file = tmp_path / "truthfulqa_robust_endpoint.jsonl"
        lines = log_file.read_text().splitlines(keepends=True)
        log_file.write_text("".join(lines[:3]) + lines[3][:20])  # killed: 2 answers kept, one torn line
        sent = len(server.requests)
        again = run_truthfulqa(client(server), "tiny-local", tmp_path, mode="robust", limit=3, data=tqa.DEFAULT_CSV,
                               log=lambda m: None)
        assert len(server.requests) - sent == 4  # 6 prompts, 2 on file
        for k in ("accuracy", "expected_accuracy", "expected_accuracy_bounds", "logprob_unresolved"):
            assert again[k] == first[k]
        with pytest.raises(ep.EvalInputError, match="other settings.*endpoint_model"):
            run_truthfulqa(client(server), "other-model", tmp_path, mode="robust", limit=3, data=tqa.DEFAULT_CSV,
                           log=lambda m: None)


def test_self_recognition_first_token_equals_local(gen, tmp_path):
    data = sr.DEFAULT_DATA_DIR
    pairs, _ = sr.build_pairs(sr.load_articles(data, "cnn"), sr.load_summaries(data, "cnn", "hf_qwen_32b"),
                              sr.load_summaries(data, "cnn", "claude-21"), limit=3)
    convs, _ = sr.build_prompts(pairs)
    stats = gen.answer_stats(convs, sr.CHOICES, choices=sr.CHOICES, **PAPER_SAMPLING, max_new_tokens=1,
                             batch_size=1)
    with serve(gen) as server:
        s = run_self_recognition(client(server), "tiny-local", tmp_path, pairs=pairs, dataset="cnn",
                                 self_name="hf_qwen_32b", other="claude-21", log=lambda m: None)
    rows = list(_csv(tmp_path / "self_recognition_cnn_results.csv"))
    for r, conv, st in zip(rows, convs, stats):
        want, _ = truncated_local(gen, conv, sr.CHOICES)
        assert float(r["p_self"]) == pytest.approx(want[r["self_position"]], abs=1e-12)
        assert float(r["p_self_lo"]) - 1e-12 <= st.p_answer[r["self_position"]] <= float(r["p_self_hi"]) + 1e-12
        assert r["choice"] == ("1" if st.logprobs["1"] >= st.logprobs["2"] else "2")
    assert s["expected_statistic"] == "expected_first_token" and s["n_prompts"] == 6
    assert s["statistic"] == "logprob" and s["accuracy"] == s["logprob_accuracy"]


def test_sampled_replicates_are_labelled_and_seeded(gen, tmp_path):
    with serve(gen) as server:
        s = run_truthfulqa(client(server), "tiny-local", tmp_path, mode="sampled", limit=4, replicates=2,
                           send_top_k=True, data=tqa.DEFAULT_CSV, log=lambda m: None)
        bodies = [b for _, _, b in server.requests]
    assert s["statistic"] == "sampled" and s["sampler"] == "endpoint" and s["replicate_seeds"] == [0, 1]
    assert len(bodies) == 8 and all(b["top_k"] == 50 and b["temperature"] == 0.7 and b["top_p"] == 0.9 for b in bodies)
    assert len({b["seed"] for b in bodies}) == 8
    rows = list(_csv(tmp_path / "truthfulqa_sampled_results.csv"))
    for rep in (0, 1):
        mine = [r for r in rows if r["replicate_seed"] == str(rep)]
        assert [r["correct_letter"] == "A" for r in mine] == tqa.paper_correct_first(4, rep)
        assert s["replicate_accuracies"][rep] == sum(r["sampled_correct"] == "True" for r in mine) / 4
    assert s["accuracy"] == sum(s["replicate_accuracies"]) / 2


def test_first_token_outcome_hand_made():
    """Three tokens returned (mass 0.8); the tail (0.2) can hold at most 2 tokens of 0.1 each."""
    top = [("A", math.log(0.5)), (" B", math.log(0.2)), ("x", math.log(0.1))]
    o = ep.first_token_outcome(top, ("A", "B"), temperature=1.0, top_k=None, top_p=1.0)
    assert o.p == pytest.approx({"A": 0.625, "B": 0.25}) and o.top_mass == pytest.approx(0.8)
    assert o.bounds["A"] == pytest.approx((0.5, 0.7))  # the true value: tail all A (0.7), none A (0.5)
    assert o.bounds[ep.INVALID] == pytest.approx((0.1, 0.3))
    # top-p 0.4 keeps only "A" whatever the tail: an exact answer.
    o = ep.first_token_outcome(top, ("A", "B"), temperature=1.0, top_k=None, top_p=0.4)
    assert o.p["A"] == 1.0 and o.bounds["A"] == (1.0, 1.0)
    assert ep.logprob_choice(top, ("A", "B")) == ("A", {"A": math.log(0.5), "B": None})
    assert ep.logprob_choice(top[1:], ("A", "B"))[0] == ""  # " B" is not the token "B": unresolved
    with pytest.raises(ep.EndpointResponseError, match="sum to probability"):
        ep.first_token_outcome([("A", 0.0), ("B", -0.1)], ("A", "B"), temperature=1.0, top_k=None, top_p=1.0)


def test_cli_endpoint_and_one_line_errors(gen, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SGTR_TEST_KEY", "sk-test")
    with serve(gen) as server:
        rc = tqa.main(["--endpoint", server.url, "--endpoint-model", "tiny-local", "--endpoint-key-env",
                       "SGTR_TEST_KEY", "--mode", "expected", "--limit", "2", "--out", str(tmp_path)])
        assert rc == 0 and server.requests[0][1]["Authorization"] == "Bearer sk-test"
        rc = sr.main(["--endpoint", server.url, "--endpoint-model", "tiny-local", "--self-name", "hf_qwen_32b",
                      "--limit", "2", "--out", str(tmp_path)])
        assert rc == 0
    summary = json.loads((tmp_path / "truthfulqa_expected_summary.json").read_text())
    assert summary["statistic"] == "expected_top20" and summary["n"] == 2
    summary = json.loads((tmp_path / "self_recognition_cnn_summary.json").read_text())
    assert summary["n_prompts"] == 4 and summary["expected_statistic"] == "expected_first_token"
    assert (tmp_path / "self_recognition_cnn_endpoint.jsonl").read_text().count("\n") == 5  # header + 4 answers
    with Loopback([(401, {"error": {"message": "Incorrect API key"}})]) as server:
        rc = tqa.run_cli(tqa.main, ["--endpoint", server.url, "--endpoint-model", "m", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "HTTP 401" in err and "Incorrect API key" in err
    with Loopback([(200, _completion("A", []))]) as server:  # no log-probs: told to sample
        rc = tqa.run_cli(tqa.main, ["--endpoint", server.url, "--endpoint-model", "m", "--out", str(tmp_path / "y")])
    assert rc == 2 and "--mode sampled" in capsys.readouterr().err
    assert tqa.run_cli(tqa.main, ["--endpoint", "http://x", "--out", str(tmp_path)]) == 2
    assert "--endpoint-model" in capsys.readouterr().err
    with pytest.raises(EndpointRequestError):
        OpenAIClient("ftp://nowhere")


def _csv(path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


@pytest.mark.parametrize("shape", ["peaked", "flat", "answer_tail"])
def test_bounds_hold_for_random_vocabularies(shape):
    """Random 200-token distributions: the truncated value is the engine's warpers on the top 20
    alone, and the bounds from the top 20 contain the engine's untruncated value (including tails
    that put the answers' mass outside the top 20)."""
    gen_ = torch.Generator().manual_seed(["peaked", "flat", "answer_tail"].index(shape))
    texts = ["A", "B", " A", " B"] + [f"t{i}" for i in range(196)]
    for _ in range(40):
        logits = torch.randn(200, generator=gen_, dtype=torch.float64) * (3.0 if shape == "peaked" else 0.7)
        if shape == "answer_tail":  # the answers just below the 20th token
            order = logits.argsort(descending=True)
            logits[[0, 1, 2, 3]], logits[order[20:24]] = logits[order[20:24]].clone(), logits[[0, 1, 2, 3]].clone()
        lp = torch.log_softmax(logits, -1)
        top = lp.topk(20)
        entries = [(texts[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
        o = ep.first_token_outcome(entries, ("A", "B"), temperature=0.7, top_k=50, top_p=0.9)
        full = sampling_probs(logits[None], *WARP)[0]
        masked = torch.full_like(logits, -math.inf)
        masked[top.indices] = logits[top.indices]
        trunc = sampling_probs(masked[None], *WARP)[0]
        for ans, ids in (("A", [0, 2]), ("B", [1, 3])):
            assert o.p[ans] == pytest.approx(float(trunc[ids].sum()), abs=1e-12)
            lo, hi = o.bounds[ans]
            assert lo - 1e-12 <= float(full[ids].sum()) <= hi + 1e-12
        lo, hi = o.bounds[ep.INVALID]
        assert lo - 1e-12 <= float(full[4:].sum()) <= hi + 1e-12
