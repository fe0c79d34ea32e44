"""evals.openai_client against a scripted chat-completions server on 127.0.0.1 (tests/loopback.py):
the request it sends, top log-probs, retries (429, 5xx), one-line errors (401, 400, malformed
answers), rate limiting; and the endpoint judge's scores from hand-made top log-probs."""

from __future__ import annotations

import math

import pytest

from engine.errors import EngineError, one_line
from evals.judges import EndpointJudge
from evals.openai_client import (
    EndpointRequestError,
    EndpointResponseError,
    EndpointUnavailableError,
    OpenAIClient,
)
from tests.loopback import Loopback, completion

MESSAGES = [{"role": "user", "content": "Rate this: 0 to 100."}]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def client(server, sleeps=None, **kwargs) -> OpenAIClient:
    kwargs.setdefault("api_key_env", "SGTR_TEST_KEY")
    return OpenAIClient(server.url, sleep=(sleeps.append if sleeps is not None else lambda s: None), **kwargs)


def test_request_and_top_logprobs(monkeypatch):
    monkeypatch.setenv("SGTR_TEST_KEY", "sk-test")
    with Loopback([(200, completion([("85", 0.5), ("90", 0.25), (" 85", 0.125), ("85", 0.0625)]))]) as server:
        result = client(server).chat("judge-1", MESSAGES, max_tokens=1, temperature=0, top_logprobs=20, seed=0)
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test" and headers["Content-Type"] == "application/json"
    assert body == {"model": "judge-1", "messages": MESSAGES, "max_tokens": 1, "temperature": 0, "logprobs": True,
                    "top_logprobs": 20, "seed": 0}
    assert result.text == "85" and result.model == "judge-1" and result.finish_reason == "length"
    assert result.tokens[0].top[1] == ("90", pytest.approx(math.log(0.25)))
    probs = result.first_token_probs()  # tokens with the same text are summed
    assert probs == {"85": pytest.approx(0.5625), "90": pytest.approx(0.25), " 85": pytest.approx(0.125)}


def test_no_key_no_header_and_full_address(monkeypatch):
    monkeypatch.delenv("SGTR_TEST_KEY", raising=False)
    with Loopback([(200, completion([("1", 1.0)]))]) as server:
        c = OpenAIClient(server.url + "/chat/completions/", api_key_env="SGTR_TEST_KEY")
        assert c.url == server.url + "/chat/completions"
        assert c.chat("m", MESSAGES).tokens == ()  # no logprobs asked: none parsed
    assert "Authorization" not in server.requests[0][1]


def test_429_is_retried_after_retry_after_then_succeeds():
    script = [(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "3"}),
              (429, {"error": {"message": "Rate limit reached"}}), (200, completion([("7", 1.0)]))]
    sleeps: list[float] = []
    with Loopback(script) as server:
        c = client(server, sleeps, backoff_s=0.5)
        assert c.chat("m", MESSAGES, top_logprobs=5).text == "7"
    assert len(server.requests) == 3 and c.requests_sent == 3
    assert sleeps == [3.0, 1.0]  # the server's Retry-After, then backoff 0.5 * 2**1


def test_500_retried_with_exponential_backoff_then_success():
    script = [(500, "oops"), (502, "<html>bad gateway</html>"), (503, {"error": "busy"}), (200, completion([("42", 1.0)]))]
    sleeps: list[float] = []
    with Loopback(script) as server:
        assert client(server, sleeps, backoff_s=1.0, max_backoff_s=3.0).chat("m", MESSAGES, top_logprobs=1).text == "42"
    assert sleeps == [1.0, 2.0, 3.0]  # 1, 2, 4 capped at 3


def test_retries_exhausted_is_one_line():
    with Loopback([(503, {"error": {"message": "overloaded\nplease retry"}})]) as server:
        with pytest.raises(EndpointUnavailableError) as e:
            client(server, max_retries=2).chat("m", MESSAGES)
    assert len(server.requests) == 3
    msg = str(e.value)
    assert "\n" not in msg and "still failing after 2 retries" in msg and "HTTP 503" in msg and "overloaded please retry" in msg


@pytest.mark.parametrize("status,payload,key,expected", [
    (401, {"error": {"message": "Incorrect API key provided: sk-bad."}}, "sk-bad",
     ["HTTP 401", "Incorrect API key provided", "check the API key in $SGTR_TEST_KEY"]),
    (401, {"error": {"message": "Missing bearer"}}, None, ["HTTP 401", "no API key was sent: set $SGTR_TEST_KEY"]),
    (400, {"error": {"message": "logprobs is not supported\nfor this model", "type": "invalid_request_error"}}, "k",
     ["HTTP 400", "logprobs is not supported for this model"]),
    (404, "<html>no such route</html>", "k", ["HTTP 404", "<html>no such route</html>"]),
])
def test_4xx_is_a_clear_one_line_error_without_retry(monkeypatch, status, payload, key, expected):
    if key:
        monkeypatch.setenv("SGTR_TEST_KEY", key)
    else:
        monkeypatch.delenv("SGTR_TEST_KEY", raising=False)
    with Loopback([(status, payload), (200, completion([("1", 1.0)]))]) as server:
        with pytest.raises(EndpointRequestError) as e:
            client(server).chat("m", MESSAGES)
    assert len(server.requests) == 1 and e.value.status == status
    assert isinstance(e.value, EngineError) and one_line(e.value) == str(e.value)
    for part in expected:
        assert part in str(e.value)
    assert str(e.value).startswith(f"endpoint {server.url}/chat/completions: ")


@pytest.mark.parametrize("payload,match", [
    ("{not json", "the answer is not JSON"),
    ([1, 2], "expected a JSON object"),
    ({"object": "chat.completion"}, "no choices"),
    ({"choices": [{"message": {"content": "7"}}]}, "no logprobs.content"),
    ({"choices": [{"message": {"content": "7"}, "logprobs": {"content": [{"token": "7"}]}}]}, "malformed logprobs"),
])
def test_malformed_answers(payload, match):
    with Loopback([(200, payload)]) as server:
        with pytest.raises(EndpointResponseError, match=match) as e:
            client(server).chat("m", MESSAGES, top_logprobs=20)
    assert len(server.requests) == 1 and "\n" not in str(e.value)


def test_network_failure_is_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    c = OpenAIClient(f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=1, sleep=sleeps.append)
    with pytest.raises(EndpointUnavailableError, match="still failing after 1 retries"):
        c.chat("m", MESSAGES)
    assert sleeps == [1.0]


def test_rate_limit_spaces_request_starts():
    now = [100.0]
    sleeps: list[float] = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    with Loopback([(200, completion([("1", 1.0)]))]) as server:
        c = OpenAIClient(server.url, api_key_env=None, requests_per_minute=120, sleep=sleep, clock=lambda: now[0])
        for _ in range(3):
            c.chat("m", MESSAGES)
    assert sleeps == [0.5, 0.5]  # 120 per minute: starts 0.5 s apart


def test_bad_settings():
    with pytest.raises(EndpointRequestError, match="must start with http"):
        OpenAIClient("api.openai.com/v1")
    with pytest.raises(EndpointRequestError, match="requests_per_minute must be positive"):
        OpenAIClient("http://127.0.0.1:1/v1", requests_per_minute=0)


# ------------------------------------------------------------------------- endpoint judge
def test_endpoint_judge_scores_hand_made_top_logprobs():
    """Betley et al.'s rule on the first token's top-20: numbers by int(text) in 0..100,
    renormalised; none under 0.25 of the mass; CODE / REFUSAL by their first tokens."""
    replies = {
        "a": [("20", 0.5), ("30", 0.3), ("CODE", 0.1), ("x", 0.1)],  # (20*.5 + 30*.3) / .8 = 23.75
        "b": [(" 80", 0.4), ("101", 0.2), ("-5", 0.1), ("4.5", 0.1), ("90", 0.1)],  # (80*.4 + 90*.1) / .5 = 82
        "c": [("CODE", 0.6), ("10", 0.2), ("REF", 0.1)],  # numbers 0.2 < 0.25: no score, CODE
        "d": [("REF", 0.3), ("USAL", 0.05), ("RE", 0.1), ("50", 0.249), ("I", 0.3)],  # REFUSAL 0.4 > other
        "e": [("50", 0.25), ("Sure", 0.75)],  # exactly 0.25 on numbers: scored
        "f": [],  # no token at all: no score
    }
    with Loopback(lambda req: (200, completion(replies[req[2]["messages"][0]["content"]]))) as server:
        judge = EndpointJudge(OpenAIClient(server.url, api_key_env=None), "judge-1", concurrency=3)
        verdicts = dict(zip(replies, judge.judge(list(replies))))
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 and b["top_logprobs"] == 20 and b["seed"] == 0
               and b["model"] == "judge-1" for _, _, b in server.requests)
    a, top = verdicts["a"]
    assert a.score == pytest.approx(23.75) and a.label == "score" and a.p_number == pytest.approx(0.8)
    assert a.p_code == pytest.approx(0.1) and top[0] == ["20", pytest.approx(math.log(0.5))]
    assert verdicts["b"][0].score == pytest.approx(82.0) and verdicts["b"][0].p_number == pytest.approx(0.5)
    c = verdicts["c"][0]
    assert c.score is None and c.label == "CODE" and c.p_code == pytest.approx(0.6) and c.p_refusal == pytest.approx(0.1)
    d = verdicts["d"][0]
    assert d.score is None and d.label == "REFUSAL" and d.p_refusal == pytest.approx(0.4)
    assert verdicts["e"][0].score == pytest.approx(50.0)
    assert verdicts["f"][0].score is None and verdicts["f"][0].label == "other"
