"""A small client for OpenAI-compatible chat-completion endpoints, standard library only.

    client = OpenAIClient("https://api.openai.com/v1", api_key_env="OPENAI_API_KEY")
    result = client.chat("gpt-4o-2024-08-06", [{"role": "user", "content": "Say 7"}],
                         max_tokens=1, temperature=0, top_logprobs=20, seed=0)
    result.text                    # "7"
    result.first_token_probs()     # {"7": 0.98, "8": 0.01, ...}: the first token's top log-probs, exponentiated

`base_url` is the API root (`.../v1`; requests go to `<base_url>/chat/completions`) or the full
`.../chat/completions` address. Any server speaking the OpenAI chat-completions protocol works
(OpenAI, Azure's OpenAI-compatible routes, vLLM, SGLang, llama.cpp's server...).

Failures are `engine.errors.EngineError` subclasses with one-line messages:

- `EndpointRequestError`: a 4xx other than 408/409/429 (bad request, wrong key, unknown model):
  the request is wrong and is not retried; the message names the address, the status and the
  server's own error text (and the key's environment variable on 401/403);
- `EndpointUnavailableError`: 408, 409, 429, 5xx, a timeout or a network error still failing
  after `max_retries` retries (exponential backoff from `backoff_s`, capped at `max_backoff_s`,
  or the server's `Retry-After` when it gives one);
- `EndpointResponseError`: a 2xx answer that is not the JSON a chat completion is (not JSON, no
  `choices`, no `logprobs` when they were asked for). Not retried: a server that answers like
  this usually keeps doing so.

`requests_per_minute` spaces the starts of requests at least 60/rpm seconds apart, across all the
threads that share the client (the client is thread-safe; callers parallelise with threads).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.errors import EngineError

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(EngineError, RuntimeError):
    """Base of the endpoint client's errors."""


class EndpointRequestError(EndpointError, ValueError):
    """The endpoint refused the request (4xx): wrong key, model, or parameters. Not retried.
    `status` 0: the client's own settings were refused before anything was sent."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class EndpointUnavailableError(EndpointError):
    """Rate limits, server errors or network failures outlasted the retries."""


class EndpointResponseError(EndpointError, ValueError):
    """A successful HTTP answer whose body is not the expected chat-completion JSON."""


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token: its text, log-probability, and the top alternatives (text, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ChatResult:
    text: str  # choices[0].message.content ("" when null)
    finish_reason: str | None
    tokens: tuple[TokenLogprobs, ...]  # choices[0].logprobs.content; empty when not asked for
    model: str | None  # the model the server says answered
    usage: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)  # the whole response body

    def first_token_probs(self) -> dict[str, float]:
        """The first generated token's top alternatives as {text: probability}; tokens whose
        texts coincide are summed. Empty when the server returned no token (some do, rarely)."""
        out: dict[str, float] = {}
        for text, logprob in self.tokens[0].top if self.tokens else ():
            out[text] = out.get(text, 0.0) + math.exp(logprob)
        return out


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OpenAIClient:
    """Chat completions against one OpenAI-compatible endpoint (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        requests_per_minute: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`api_key`, else the environment variable `api_key_env` (read now); no key: no
        Authorization header (local servers often need none)."""
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise EndpointRequestError(f"endpoint URL must start with http:// or https://, got {base_url!r}", 0)
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.api_key_env = api_key_env
        self.api_key = api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None) or None
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise EndpointRequestError("max_retries and backoff_s must be >= 0 and timeout_s > 0", 0)
        if requests_per_minute is not None and not requests_per_minute > 0:
            raise EndpointRequestError(f"requests_per_minute must be positive, got {requests_per_minute!r}", 0)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.min_interval_s = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._next_start = -math.inf
        self.requests_sent = 0  # HTTP requests made, retries included

    # ------------------------------------------------------------------------------ API
    def chat(
        self,
        model: str,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_logprobs: int | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> ChatResult:
        """One chat completion. `top_logprobs` (0-20) also asks for `logprobs`; `extra` goes
        into the request body as is (e.g. `max_completion_tokens`, `top_p`, `stop`)."""
        body: dict[str, Any] = {"model": model, "messages": messages}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = top_logprobs
        if seed is not None:
            body["seed"] = seed
        body.update(extra)
        return self._parse(self.post(body), want_logprobs=top_logprobs is not None)

    def post(self, body: dict) -> dict:
        """POST `body` as JSON with retries; the decoded JSON answer (a dict)."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(self._delay(attempt, retry_after))
            retry_after = None
            self._wait_for_slot()
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                self.requests_sent += 1
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                detail = self._error_detail(e)
                if e.code not in RETRY_STATUSES:
                    raise EndpointRequestError(self._refusal_message(e.code, e.reason, detail), e.code) from None
                last = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                continue
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
                continue
            return self._decode(payload)
        raise EndpointUnavailableError(
            f"endpoint {self.url}: still failing after {self.max_retries} retries (last: {_one_line(last)})")

    # -------------------------------------------------------------------------- helpers
    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)

    def _wait_for_slot(self) -> None:
        """Rate limiting: reserve the next start time under the lock, sleep outside it."""
        if not self.min_interval_s:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next_start)
            self._next_start = start + self.min_interval_s
        if start > now:
            self._sleep(start - now)

    @staticmethod
    def _error_detail(e: urllib.error.HTTPError) -> str:
        try:
            text = e.read().decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the body is only for the message
            return ""
        try:
            obj = json.loads(text)
            if isinstance(obj, dict):
                err = obj.get("error", obj)
                msg = err.get("message") if isinstance(err, dict) else err
                if msg:
                    return _one_line(str(msg))
        except json.JSONDecodeError:
            pass
        return _one_line(text, 200)

    def _refusal_message(self, status: int, reason: str, detail: str) -> str:
        msg = f"endpoint {self.url}: HTTP {status} {reason}" + (f": {detail}" if detail else "")
        if status in (401, 403):
            if self.api_key:
                msg += f" (check the API key{f' in ${self.api_key_env}' if self.api_key_env else ''})"
            else:
                msg += f" (no API key was sent: set ${self.api_key_env or 'OPENAI_API_KEY'})"
        return msg

    def _decode(self, payload: bytes) -> dict:
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EndpointResponseError(
                f"endpoint {self.url}: the answer is not JSON: {_one_line(payload.decode('utf-8', 'replace'), 120)!r}"
            ) from None
        if not isinstance(obj, dict):
            raise EndpointResponseError(f"endpoint {self.url}: expected a JSON object, got {type(obj).__name__}")
        return obj

    def _parse(self, obj: dict, want_logprobs: bool) -> ChatResult:
        def bad(what: str) -> EndpointResponseError:
            return EndpointResponseError(f"endpoint {self.url}: not a chat completion ({what}): {_one_line(json.dumps(obj), 160)}")

        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad("no choices")
        choice = choices[0]
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message, dict) else None
        tokens: list[TokenLogprobs] = []
        logprobs = choice.get("logprobs")
        if want_logprobs:
            content = logprobs.get("content") if isinstance(logprobs, dict) else None
            if not isinstance(content, list):
                raise bad("no logprobs.content")
            try:
                for t in content:
                    top = tuple((str(a["token"]), float(a["logprob"])) for a in t.get("top_logprobs") or [])
                    tokens.append(TokenLogprobs(str(t["token"]), float(t["logprob"]), top))
            except (KeyError, TypeError, ValueError, AttributeError):
                raise bad("malformed logprobs") from None
        return ChatResult(text=text or "", finish_reason=choice.get("finish_reason"), tokens=tuple(tokens),
                          model=obj.get("model"), usage=obj.get("usage") or {}, raw=obj)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (HTTP dates are ignored)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 and math.isfinite(seconds) else None


__all__ = [
    "ChatResult", "EndpointError", "EndpointRequestError", "EndpointResponseError", "EndpointUnavailableError",
    "OpenAIClient", "TokenLogprobs",
]
