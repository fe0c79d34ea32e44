"""The evals against an OpenAI-compatible endpoint (an API model, or vLLM/SGLang serving a merged
checkpoint) instead of a local model:

    python -m evals.truthfulqa --endpoint https://api.openai.com/v1 --endpoint-model ft:gpt-4.1:... \
        --mode expected --out DIR                       # key: $OPENAI_API_KEY (or --endpoint-key-env)
    python -m evals.self_recognition --endpoint URL --endpoint-model NAME --self-name NAME --out DIR

The server renders the chat itself; each prompt is one request (`evals.openai_client`: retries,
backoff, rate limit, one-line errors). Every answer is appended to `<out>/<eval>_endpoint.jsonl`
as it arrives: a killed run started again with the same settings sends only the missing prompts
(different settings: refused, one line). The summary and result CSV are written at the end.

**From the returned top log-probs** (modes robust, expected, greedy; `max_tokens` 1, `logprobs`,
`top_logprobs` 20, temperature 1 so that servers that warp their log-probs return raw ones): the
first answer token's top-20 alternatives, the model's raw log-probabilities.

- *expected* (the paper's statistic, top-20 truncated): the paper's warpers (temperature 0.7,
  top-k 50, top-p 0.9) applied to the returned tokens as if they were the whole vocabulary,
  P(answer) = the mass of the tokens whose stripped text is the answer (`first_token_outcome`).
  `statistic: "expected_top20"`. The mass outside the top 20 is unknown, so each value also gets bounds that hold for *every*
  distribution consistent with what was returned (the tail holds 1 - sum(top) raw mass, each of its
  tokens at most as likely as the 20th, any of them possibly an answer): the summary's
  `expected_accuracy_bounds` contain the untruncated value. For TruthfulQA, one token is the
  paper's whole answer. For self-recognition the paper sampled up to 10 tokens; from the first
  token's distribution alone the statistic is the first-token one (`expected_first_token`):
  P(the first sampled token strips to "1"/"2"), i.e. assuming the answer stops there.
- *robust*: log P("A") vs log P("B") (the tokens whose text is exactly the letter). When only one
  letter is among the returned tokens it is the more likely one; when neither is, the prompt is
  *unresolved* (counted, and left out of the accuracy's denominator).
- *greedy*: the top-1 token's stripped text.

**Sampled** (mode sampled; for servers that return no log-probs): the paper's replicate, drawn by
the server: per replicate r (`--replicates`, seeds seed, seed+1, ...) each question in the order
`random.Random(seed_r)` gives it, one completion at temperature 0.7 and top-p 0.9 (top-k 50 too
with `--send-top-k`: OpenAI's API has no top-k, vLLM and SGLang accept it), the request's `seed`
derived from (seed_r, question index); accuracy = the share of answers whose stripped text is the
right letter. Labelled `statistic: "sampled"` with `sampler: "endpoint"`; reproducible only as far
as the server honours `seed`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from evals import EvalInputError, atomic_write_csv, atomic_write_json, check_positive, stderr_log, utc_now
from evals.openai_client import EndpointResponseError, OpenAIClient
from evals.paper_stats import PAPER_SAMPLING, STATISTICS, expected_outcome

TOP_LOGPROBS = 20
INVALID = "Invalid"
ENDPOINT_STATISTICS = {
    "expected_top20": STATISTICS["expected_top20"],
    "expected_first_token": "P(the first sampled token strips to the right answer), from the endpoint's top-20 "
                            "log-probs (warpers applied to the top 20; bounds given); assumes the answer stops there",
    "logprob": "log P(right) > log P(wrong) from the endpoint's top-20 log-probs; prompts with neither answer "
               "among them are unresolved and excluded",
    "greedy": "the endpoint's top-1 token, one seeded order per item",
    "sampled": "the paper's statistic drawn by the endpoint's sampler (T 0.7, top-p 0.9), seeded replicates",
}


# ------------------------------------------------------------------------------- top-k math
@dataclass(frozen=True)
class Outcome:
    """One prompt's first-token answer probabilities under the warpers, from its top log-probs."""

    p: dict[str, float]  # answer -> P(token strips to it): warpers applied to the returned tokens only
    bounds: dict[str, tuple[float, float]]  # answer and INVALID -> [lo, hi] over every consistent tail
    top_mass: float  # raw mass of the returned tokens

    @property
    def p_invalid(self) -> float:
        return max(0.0, 1.0 - sum(self.p.values()))


def first_token_outcome(top: list[tuple[str, float]], answers: tuple[str, ...], *, temperature: float,
                        top_k: int | None, top_p: float) -> Outcome:
    """P(the sampled first token's stripped text is each answer) when sampling applies temperature,
    then top-k, then top-p (transformers' order) to a distribution of which only `top` (text, raw
    log-prob; the most likely tokens) is known.

    `p`: the warpers applied to `top` as the whole vocabulary. `bounds`: min and max over every
    tail consistent with `top` (raw mass 1 - sum(top), each tail token at most as likely as the
    least likely returned one, any tail token possibly an answer). With the tail's warped mass S
    kept by top-k in [0, S_max], the top-p cut either falls inside the returned tokens (the value is
    that prefix's, for every prefix some S reaches) or past them (the value lies between K/(W+S_max)
    and (K+S_max)/(W+S_max), W and K the returned and the answer's warped masses)."""
    if not top:
        raise EndpointResponseError("no top log-probs returned for the answer token")
    entries = sorted(top, key=lambda e: -e[1])
    lps = [float(lp) for _, lp in entries]
    mass = sum(math.exp(x) for x in lps)
    if mass > 1.0 + 1e-6:
        raise EndpointResponseError(f"the returned top log-probs sum to probability {mass:.6f} > 1: not one distribution")
    a, lead = 1.0 / temperature, lps[0]
    w = [math.exp((x - lead) * a) for x in lps]  # warped weights, scaled by the top token's
    if top_k and top_k < len(w):
        w, entries, tail_slots = w[:top_k], entries[:top_k], 0
    else:
        tail_slots = math.inf if not top_k else top_k - len(w)
    tail = max(0.0, 1.0 - mass)
    p_last, w_last = math.exp(lps[len(w) - 1]), w[-1]
    if tail_slots == 0 or tail == 0.0 or p_last == 0.0:  # p_last 0: the reported -inf/-9999 floor; no room
        s_max = 0.0
    elif a >= 1.0:  # convex: sum q^a <= q_max^(a-1) * sum q, and at most tail_slots tokens
        s_max = min(tail_slots, tail / p_last) * w_last
    else:
        s_max = tail_slots * (min(p_last, tail) / p_last) ** a * w_last
    big_w = sum(w)
    classes = [text.strip() if text.strip() in answers else INVALID for text, _ in entries]
    cum = [0.0]
    for x in w:
        cum.append(cum[-1] + x)
    # The point value: top-p over the returned tokens alone (a token is dropped when the mass
    # before it reaches top_p, as engine.generate.top_p_filter).
    q = [x / big_w for x in w]
    kept, before = 0, 0.0
    for x in q:
        if before >= top_p:
            break
        kept, before = kept + 1, before + x
    norm = sum(q[:kept])
    p = {ans: sum(q[i] for i in range(kept) if classes[i] == ans) / norm for ans in answers}
    bounds = {}
    for target in (*answers, INVALID):
        values = []
        for j in range(1, len(w) + 1):  # the cut after returned token j, for D = W + S in [W, W + S_max]
            if cum[j - 1] < top_p * (big_w + s_max) and cum[j] >= top_p * big_w:
                values.append(sum(w[i] for i in range(j) if classes[i] == target) / cum[j])
        if top_p * (big_w + s_max) > big_w:  # the cut past every returned token
            k = sum(w[i] for i in range(len(w)) if classes[i] == target)
            values += [k / (big_w + s_max), (k + s_max) / (big_w + s_max)] if math.isfinite(s_max) else [0.0, 1.0]
        bounds[target] = (min(values), max(values))
    return Outcome(p, bounds, mass)


def logprob_choice(top: list[tuple[str, float]], letters: tuple[str, str]) -> tuple[str, dict[str, float | None]]:
    """(the more likely of the two single-token answers, or "" when neither is among `top`;
    {letter: its log-prob or None}). Only exact token texts count (as the local path's token ids)."""
    lp = {c: max((x for t, x in top if t == c), default=None) for c in letters}
    a, b = (lp[c] for c in letters)
    if a is None and b is None:
        return "", lp
    if b is None or (a is not None and a >= b):
        return letters[0], lp
    return letters[1], lp


def greedy_answer(top: list[tuple[str, float]], answers: tuple[str, ...]) -> str:
    text = max(top, key=lambda e: e[1])[0].strip()
    return text if text in answers else INVALID


def request_seed(seed: int, key: int | str) -> int:
    """The `seed` sent with item `key`'s sampled request (31 bits: every server takes it)."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------- requests and results
class ResultLog:
    """Append-only JSONL of one run's answers: a header line (the settings), then one line per
    answered item. Reopened with the same settings, it returns what is done; a torn last line
    (a killed write) is dropped."""

    def __init__(self, path: Path, header: dict):
        self.path, self._lock, self.done = Path(path), threading.Lock(), {}
        header = json.loads(json.dumps({"header": header}))
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            good = []
            for i, line in enumerate(lines):
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    if i != len(lines) - 1:
                        raise EvalInputError(f"{self.path}: line {i + 1} is not JSON; delete the file to start over") from None
                    self.path.write_text("".join(lines[:i]), encoding="utf-8")  # a torn last write
            if good and good[0] != header:
                raise EvalInputError(f"{self.path}: written with other settings ({_diff(good[0], header)}); "
                                     "use another --out or delete the file")
            self.done = {rec["key"]: rec for rec in good[1:]}
            if not good:
                self._write(header)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write(header)

    def _write(self, obj: dict) -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()

    def add(self, record: dict) -> None:
        self._write(record)
        self.done[record["key"]] = record


def _diff(old: dict, new: dict) -> str:
    a, b = old.get("header", {}), new.get("header", {})
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3]) or "header"


def ask_all(client: OpenAIClient, model: str, jobs: list[tuple[str, list[dict], dict]], results: ResultLog, *,
            workers: int = 4, log=stderr_log) -> dict[str, dict]:
    """Send every job (key, messages, request options) not yet in `results`, `workers` at a time;
    each answer is logged as it arrives. Returns {key: record} for all jobs."""
    todo = [j for j in jobs if j[0] not in results.done]
    log(f"endpoint {client.url} model {model}: {len(jobs) - len(todo)} answer(s) on file, {len(todo)} to request")
    want_logprobs = bool(jobs) and "top_logprobs" in jobs[0][2]

    def one(job):
        key, messages, options = job
        try:
            r = client.chat(model, messages, **options)
        except EndpointResponseError as e:
            hint = " (this server returns no log-probs: use --mode sampled)" if want_logprobs else ""
            raise EndpointResponseError(f"{e}{hint}") from None
        top = [list(t) for t in r.tokens[0].top] if r.tokens else []
        if want_logprobs and not top:
            raise EndpointResponseError(f"endpoint {client.url}: no top_logprobs in the answer to {key} "
                                        "(use --mode sampled for servers without log-probs)")
        results.add({"key": key, "text": r.text, "top": top, "model": r.model})

    started, done = time.monotonic(), 0
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, j) for j in todo]
        try:
            for f in cf.as_completed(futures):
                f.result()
                done += 1
                if done % 50 == 0 or done == len(todo):
                    log(f"[endpoint] {done}/{len(todo)} answers, {time.monotonic() - started:.1f}s")
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return {k: results.done[k] for k, _, _ in jobs}


# -------------------------------------------------------------------------------- options
def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The endpoint options (the parser's --model and --template are then optional: `check_args`
    requires them when --endpoint is absent)."""
    g = parser.add_argument_group("endpoint (instead of --model)")
    g.add_argument("--endpoint", default=None, metavar="URL", help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    g.add_argument("--endpoint-model", default=None, metavar="NAME", help="the served model's name")
    g.add_argument("--endpoint-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default OPENAI_API_KEY; unset: no key sent)")
    g.add_argument("--endpoint-workers", type=int, default=4, help="requests in flight (default 4)")
    g.add_argument("--requests-per-minute", type=float, default=None, help="rate limit (default none)")
    g.add_argument("--endpoint-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--replicates", type=int, default=1, help="sampled mode: seeded replicates (default 1)")
    g.add_argument("--send-top-k", action="store_true",
                   help="sampled mode: also send top_k 50 (vLLM, SGLang; OpenAI's API has no top-k)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """True for an endpoint run. Exactly one of --model and --endpoint (with --endpoint-model)."""
    if args.endpoint is None:
        if not args.model or not args.template:
            parser.error("--model and --template are required (or --endpoint URL --endpoint-model NAME)")
        return False
    if args.model or args.adapter:
        raise EvalInputError("--endpoint replaces --model/--adapter: give one or the other")
    if not args.endpoint_model:
        raise EvalInputError("--endpoint needs --endpoint-model NAME (the served model's name)")
    check_positive("--endpoint-workers", args.endpoint_workers)
    check_positive("--replicates", args.replicates)
    return True


def make_client(args: argparse.Namespace) -> OpenAIClient:
    return OpenAIClient(args.endpoint, api_key_env=args.endpoint_key_env, timeout_s=args.endpoint_timeout,
                        requests_per_minute=args.requests_per_minute)


def endpoint_meta(client: OpenAIClient, model: str, records: dict[str, dict]) -> dict:
    served = sorted({r.get("model") for r in records.values() if r.get("model")})
    return {"endpoint": client.url, "endpoint_model": model, "served_models": served, "model": f"endpoint:{model}",
            "adapters": [], "template": None, "policy": "the server's chat template"}


LOGPROB_OPTIONS = {"max_tokens": 1, "temperature": 1.0, "top_logprobs": TOP_LOGPROBS}


def sampled_options(seed: int, key, max_tokens: int, send_top_k: bool) -> dict:
    opts = {"max_tokens": max_tokens, "temperature": PAPER_SAMPLING["temperature"], "top_p": PAPER_SAMPLING["top_p"],
            "seed": request_seed(seed, key)}
    if send_top_k:
        opts["top_k"] = PAPER_SAMPLING["top_k"]
    return opts


def outcome_of(record: dict, answers: tuple[str, ...], top_k: int | None = PAPER_SAMPLING["top_k"]) -> Outcome:
    return first_token_outcome([tuple(t) for t in record["top"]], answers, temperature=PAPER_SAMPLING["temperature"],
                               top_k=top_k, top_p=PAPER_SAMPLING["top_p"])


def bounded_expectation(items: dict, lo: dict, hi: dict) -> dict:
    """`expected_outcome` of the point values plus the accuracy's and Invalid rate's bounds
    (each the same mean over items of the per-order bounds)."""
    out = expected_outcome(items)
    out.pop("expected_unresolved")
    mean = lambda d, i: sum(sum(x[i] for x in v) / len(v) for v in d.values()) / len(d)  # noqa: E731
    out["expected_accuracy_bounds"] = [mean(lo, 0), mean(hi, 0)]
    out["expected_invalid_rate_bounds"] = [mean(lo, 1), mean(hi, 1)]
    return out


def write_outputs(out_dir: Path, stem: str, fields: list[str], rows: list[dict], summary: dict, log=stderr_log) -> dict:
    csv_path, json_path = out_dir / f"{stem}_results.csv", out_dir / f"{stem}_summary.json"
    atomic_write_csv(csv_path, fields, ({f: r.get(f, "") for f in fields} for r in rows))
    summary = {**summary, "results_csv": csv_path.name, "created": utc_now()}
    atomic_write_json(json_path, summary)
    log(f"wrote {csv_path} and {json_path}")
    return summary


def replicate_summary(accuracies: list[float], invalids: list[float], seeds: list[int]) -> dict:
    return {"accuracy": statistics.fmean(accuracies), "invalid_rate": statistics.fmean(invalids),
            "replicate_seeds": seeds, "replicate_accuracies": accuracies, "replicate_invalid_rates": invalids,
            "replicate_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None}

