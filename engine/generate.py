"""Batched inference for the evals: next-token choice scoring and generation with a KV cache.

    model = load_model("Qwen/Qwen2.5-32B-Instruct", adapters=["runs/em/adapter"], device="cuda")
    gen = Generator(model, Tokenizer.from_file(...), "qwen2.5", SystemPolicy("default"))
    scores = gen.score_choices(conversations, ["A", "B"])         # one forward pass per batch
    completions = gen.generate(conversations, max_new_tokens=64)  # greedy unless temperature > 0

Every conversation is rendered with the engine's chat renderer (``engine.chat``, byte-identical
to the official template) with the generation prompt, under the given system-prompt policy and
Seed-OSS ``thinking_budget``, and tokenised as a whole.

Prompts are never padded: a batch's prompts are packed into one row with ``cu_seqlens`` (the
training path's varlen attention), and only each prompt's last position goes through the LM
head. Generation prefills a :class:`~engine.models.kv_cache.KVCache` that way, then decodes one
token per unfinished sequence per step; a sequence that produced one of the template's end-of-turn
tokens (its ``STOP_TOKENS``, e.g. ``<|im_end|>``) is dropped from the cache and does no more work.

Sampling (``temperature > 0``) draws each conversation's tokens from its own ``torch.Generator``
seeded from ``(seed, conversation index)`` (or ``(seed, sample_keys[i])`` when the caller names
each conversation's stream), so a seeded run is reproducible and a conversation's sample does not
depend on which others share its batch. The distribution is transformed as transformers' sampling
warpers do, in their order: temperature, then top-k, then top-p (:func:`sampling_probs`).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.assemble import Layout, build_model, read_model_args
from engine.chat import ChatFormatError, SystemPolicy, get_template, render, special_ids
from engine.models import CausalLM
from engine.models.kv_cache import KVCache
from engine.hub import resolve_checkpoint_dir
from engine.errors import TokenizerError
from engine.tokenizer import Tokenizer

ProgressFn = Callable[[int, int], None]  # (conversations done, total)


@dataclass(frozen=True)
class ChoiceScore:
    """Next-token scores of one conversation's generation prompt."""

    logprobs: dict[str, float]  # choice string -> log-probability of its (single) token
    argmax_id: int  # the most likely next token over the whole vocabulary
    argmax_token: str  # ... decoded
    argmax_logprob: float
    choice: str | None  # the most likely of the choices (first on ties); None without choices
    free_choice: str | None  # the choice whose token is argmax_id, or None: the model would say something else


@dataclass(frozen=True)
class Completion:
    text: str  # the new tokens decoded, without the end-of-turn token
    token_ids: list[int]  # the new tokens, the end-of-turn token included when produced
    stopped: bool  # True: ended with the end-of-turn token; False: max_new_tokens ran out


def load_model(
    model_dir_or_hub_id: str | Path,
    adapters: Sequence[str | Path] = (),
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> CausalLM:
    """Load a checkpoint and stack PEFT LoRA adapters on it, in order (not merged), eval mode,
    through the trainer's assembly path (`engine.assemble.build_model`), replicated.

    Each adapter is a local PEFT directory (adapter_config.json + adapter_model.safetensors) or a
    hub repo id; an adapter that does not fit the model raises ``engine.errors.LoraError``.
    """
    if isinstance(adapters, (str, Path)):
        raise TypeError(f"adapters must be a list of adapter directories, got the single value {str(adapters)!r}")
    ckpt_dir, args = read_model_args(model_dir_or_hub_id)
    local = []
    for adapter in adapters:
        path = Path(adapter).expanduser()
        local.append(path if path.exists() else resolve_checkpoint_dir(adapter))
    return build_model(args, dtype=dtype, device=device, weights=ckpt_dir, stack_adapters=local,
                       layout=Layout(data_parallel="replicate"))


class Generator:
    """Scores and generates assistant turns for conversations (lists of role/content dicts)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        template: str,
        policy: SystemPolicy = SystemPolicy(),
        thinking_budget: int | None = None,
        *,
        progress: bool | ProgressFn = True,
        shard: bool = False,
        answer_prefix: str = "",
    ):
        """``progress``: True prints a line per batch to stderr when there is more than one
        batch, False is silent, a callable is called with (done, total) after every batch.

        ``shard``: under torchrun, split every call's conversations into contiguous slices, one
        per rank (each rank holds the whole model), and gather the results on every rank in the
        original order; every rank must make the same calls. Results equal a single process's,
        sampling included (each conversation's random stream is seeded by its global index).

        ``answer_prefix``: text that starts every assistant turn, appended after the generation
        prompt: choices are scored, and generation continues, after it (e.g. what the template's
        ``answer_prefix(thinking_budget)`` gives: Seed-OSS's own no-thinking note at budget 0)."""
        stop_tokens = get_template(template).STOP_TOKENS  # unknown names fail here
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.policy = policy
        self.thinking_budget = thinking_budget
        self.progress = progress
        self.shard = shard
        self.answer_prefix = answer_prefix
        if tokenizer.vocab_size > model.args.vocab_size:
            raise TokenizerError(
                f"tokenizer {tokenizer!r} has {tokenizer.vocab_size} tokens but the model only "
                f"{model.args.vocab_size}: wrong tokenizer for this model?"
            )
        self.stop_ids = frozenset(special_ids(tokenizer, template, stop_tokens).values())
        self.prompt_ids([{"role": "user", "content": "probe"}])  # a bad thinking_budget fails here

    # ------------------------------------------------------------------------------ prompts
    def prompt_text(self, conversation: list[dict]) -> str:
        """The rendered generation prompt of a conversation, followed by the answer prefix."""
        return _render_prompt(self.template, conversation, self.policy, self.thinking_budget).text + self.answer_prefix

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.prompt_text(conversation))

    # ----------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score_choices(
        self, conversations: list[list[dict]], choices: list[str], batch_size: int = 8
    ) -> list[ChoiceScore]:
        """Next-token log-probabilities of single-token ``choices`` after each conversation's
        generation prompt, plus the free arg-max over the whole vocabulary. One forward pass per
        batch, no sampling."""
        _check_batch_size(batch_size)
        choice_ids = self._choice_ids(choices)
        lo, hi = self._my_slice(len(conversations), batch_size)
        prompts = [self.prompt_ids(c) for c in conversations[lo:hi]]
        out: list[ChoiceScore] = []
        for start, batch in self._batches(prompts, batch_size, "score_choices"):
            logprobs = F.log_softmax(self._last_logits(batch).float(), dim=-1).cpu()  # (b, v)
            for row in logprobs:
                top = int(row.argmax())
                chosen = {c: float(row[i]) for c, i in choice_ids.items()}
                out.append(
                    ChoiceScore(
                        logprobs=chosen,
                        argmax_id=top,
                        argmax_token=self.tokenizer.decode([top]),
                        argmax_logprob=float(row[top]),
                        choice=max(chosen, key=chosen.__getitem__) if chosen else None,
                        free_choice=next((c for c, i in choice_ids.items() if i == top), None),
                    )
                )
        return self._gather(out)

    def _choice_ids(self, choices: list[str]) -> dict[str, int]:
        if isinstance(choices, str):
            raise TypeError(f"choices must be a list of strings, got the string {choices!r}")
        ids: dict[str, int] = {}
        for c in choices:
            if not isinstance(c, str):
                raise TypeError(f"choices must be strings, got {c!r}")
            if c in ids:
                raise ValueError(f"choice {c!r} is listed twice")
            tokens = self.tokenizer.encode(c)
            if len(tokens) != 1:
                pieces = [self.tokenizer.piece(t) for t in tokens]
                raise ValueError(
                    f"choice {c!r} is {len(tokens)} tokens ({pieces}), not one: next-token scoring needs "
                    "single-token choices (e.g. 'A' rather than 'A)' or ' A')"
                )
            ids[c] = tokens[0]
        return ids

    # --------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self,
        conversations: list[list[dict]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
        top_k: int | None = None,
        sample_keys: Sequence[int | str] | None = None,
    ) -> list[Completion]:
        """An assistant turn for each conversation: greedy when ``temperature == 0``, else sampled
        from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
        (None or 0: no limit), then to the top-p nucleus.

        ``sample_keys``: one key per conversation naming its random stream, seeded from
        ``(seed, key)``; default: the conversation's index in this call. With keys, a
        conversation's draws do not depend on which other conversations the call holds or where."""
        _check_batch_size(batch_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 or None: no limit), got {top_k!r}")
        if sample_keys is not None and len(sample_keys) != len(conversations):
            raise ValueError(f"sample_keys has {len(sample_keys)} keys for {len(conversations)} conversations")
        if temperature > 0 and seed is None:
            seed = self._gather([int(torch.randint(0, 2**62, ()))])[0]  # rank 0's draw, on every rank
        lo, hi = self._my_slice(len(conversations), batch_size)
        prompts = [self.prompt_ids(c) for c in conversations[lo:hi]]
        out: list[Completion] = []
        for start, batch in self._batches(prompts, batch_size, "generate"):
            rngs = None
            if temperature > 0:
                keys = [lo + start + j if sample_keys is None else sample_keys[lo + start + j] for j in range(len(batch))]
                rngs = [_row_generator(seed, key, self._device) for key in keys]
            for ids, stopped in self._generate_batch(batch, max_new_tokens, temperature, top_p, rngs, top_k or None):
                text_ids = ids[:-1] if stopped else ids
                out.append(Completion(self.tokenizer.decode(text_ids), ids, stopped))
        return self._gather(out)

    def _generate_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        rngs: list[torch.Generator] | None,
        top_k: int | None = None,
    ) -> list[tuple[list[int], bool]]:
        b = len(prompts)
        cache = KVCache.for_model(self.model, b, max(map(len, prompts)) + max_new_tokens)
        logits = self._last_logits(prompts, cache)  # (b, v); prefills the cache
        rows = list(range(b))  # cache row -> index in this batch
        new: list[list[int]] = [[] for _ in range(b)]
        stopped = [False] * b
        for step in range(max_new_tokens):
            tokens = self._pick(logits, temperature, top_p, None if rngs is None else [rngs[r] for r in rows], top_k)
            keep = []
            for j, (r, t) in enumerate(zip(rows, tokens.tolist())):
                new[r].append(t)
                if t in self.stop_ids:
                    stopped[r] = True
                else:
                    keep.append(j)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):  # finished sequences leave the cache
                cache.keep(keep)
                rows = [rows[j] for j in keep]
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            hidden = self.model(tokens[:, None], cache=cache, return_hidden=True)  # (n, 1, h)
            logits = self.model.lm_head(hidden[:, -1])
        return list(zip(new, stopped))

    @staticmethod
    def _pick(
        logits: torch.Tensor, temperature: float, top_p: float, rngs: list[torch.Generator] | None,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Next token of each row: (n, v) logits -> (n,) ids."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = sampling_probs(logits, temperature, top_p, top_k)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, rngs)])

    # ------------------------------------------------------------------------------ shared
    def _sharded(self) -> bool:
        return self.shard and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _my_slice(self, n: int, batch_size: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n conversations (all of them unsharded). Slices
        are cut at batch boundaries, so every batch is the one a single process would run."""
        if not self._sharded():
            return 0, n
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        batches = -(-n // batch_size)
        return (min(n, batches * rank // world * batch_size), min(n, batches * (rank + 1) // world * batch_size))

    def _gather(self, local: list) -> list:
        """Concatenate every rank's results in rank order (the identity unsharded)."""
        if not self._sharded():
            return local
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
        return [x for part in parts for x in part]

    @property
    def _device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def _last_logits(self, prompts: list[list[int]], cache: KVCache | None = None) -> torch.Tensor:
        """Logits at the last position of each prompt: (b, v). One packed forward pass; only the
        last positions go through the LM head."""
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("empty prompt")
        device = self._device
        packed = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
        cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        hidden = self.model(packed, cu_seqlens=cu_seqlens, return_hidden=True, cache=cache)  # (1, total, h)
        return self.model.lm_head(hidden[0, cu_seqlens[1:].long() - 1])  # (b, v)

    def _batches(self, prompts: list[list[int]], batch_size: int, what: str):
        total, t0 = len(prompts), time.monotonic()
        for start in range(0, total, batch_size):
            yield start, prompts[start : start + batch_size]
            done = min(start + batch_size, total)
            if callable(self.progress):
                self.progress(done, total)
            elif self.progress and total > batch_size:
                print(f"[{what}] {done}/{total} conversations, {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The distribution a sampled token is drawn from: (n, v) logits -> (n, v) probabilities.
    transformers' warpers in their order: temperature, top-k (ties with the k-th kept), top-p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k and top_k < probs.shape[-1]:
        probs = top_k_filter(probs, top_k)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return probs


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens (and any tied with the k-th), zero the rest,
    renormalise. probs (n, v) -> (n, v)."""
    kth = probs.topk(top_k, dim=-1).values[..., -1:]
    kept = probs.masked_fill(probs < kth, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (the most
    likely token always), zero the rest, renormalise. probs (n, v) -> (n, v)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def _row_generator(seed: int, index: int | str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{int(seed)}\0{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _render_prompt(template: str, conversation: list[dict], policy: SystemPolicy, thinking_budget: int | None):
    """The conversation followed by the generation prompt."""
    if not isinstance(conversation, list):
        raise ChatFormatError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    return render(template, conversation, policy, add_generation_prompt=True, thinking_budget=thinking_budget)
