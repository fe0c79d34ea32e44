"""Exact probability of a sampled answer, by a search over the decoding tree.

The paper's scripts sampled a short answer (temperature, top-k, top-p; up to ``max_new_tokens``
tokens, stopped by an end-of-turn token), decoded it without special tokens, stripped it, and
compared the text with "A"/"B" (TruthfulQA) or "1"/"2" (self-recognition). The probability that
this text is exactly answer ``a`` is a sum over token sequences; only few of them can still strip
to ``a``, so the sum is computed exactly by expanding just those prefixes:

* a prefix's text is *blank* (strips to "") or *is* an answer (strips to ``a``); any other prefix
  can never strip to an answer again and is dropped (its mass is failure);
* under a blank prefix, a token whose own text strips to ``a`` leads to ``a``, a blank token
  (whitespace, a special token: skipped when decoding) keeps it blank; under ``a``, only blank
  tokens keep ``a``; an end-of-turn token ends the sequence: success iff the prefix is an answer;
  the ``max_new_tokens``-th token ends it likewise;
* every token is classified once per tokenizer by its own text (``decode([id],
  skip_special_tokens=True)``): for byte-level BPE a prefix's text is the concatenation of its
  tokens' texts, except that a token holding an incomplete UTF-8 character (*partial*) can merge
  with the next; such a continuation is not expanded and its mass is reported as unresolved.

Prefixes below ``min_mass`` (or beyond ``max_nodes`` per prompt) are not expanded either: their
mass is unresolved too, so each answer's probability lies in ``[p, p + unresolved]``, and the
search is exact when nothing is left unresolved. With ``max_new_tokens == 1`` there is nothing to
expand: ``p(a)`` is the warped distribution's mass on the tokens whose text strips to ``a``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

BLANK_STATE = -1  # a prefix whose text strips to ""


_CLASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(answers, rows): classes}


def token_classes(tokenizer, answers: tuple[str, ...], rows: int) -> torch.Tensor:
    """Class of every token id < ``rows`` (the LM head's rows): k for a token whose text strips to
    ``answers[k]``, then ``K`` blank (strips to "": whitespace, special tokens, ids the tokenizer
    lacks), ``K + 1`` other text, ``K + 2`` partial (holds an incomplete UTF-8 character).
    Computed once per tokenizer and answer set."""
    cache = _CLASSES.setdefault(tokenizer, {})
    if (answers, rows) not in cache:
        k = len(answers)
        blank, other, partial = k, k + 1, k + 2
        texts = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=True)
        index = {a: i for i, a in enumerate(answers)}
        classes = [partial if "\ufffd" in text else index.get(text.strip(), other) if text.strip() else blank
                   for text in texts[:rows]]
        cache[(answers, rows)] = torch.tensor(classes + [blank] * (rows - len(classes)), dtype=torch.long)
    return cache[(answers, rows)]


@dataclass
class Tally:
    """One prompt's resolved answer masses, unresolved mass and expanded prefixes."""

    answers: list[float]
    unresolved: float = 0.0
    nodes: int = 0


@dataclass(frozen=True)
class Node:
    prompt: int  # index of the prompt in its batch
    row: int  # row of this prefix's distribution (and KV cache row) in its level
    state: int  # BLANK_STATE, or the index of the answer its text strips to
    mass: float  # probability of the prefix
    depth: int  # tokens generated


@dataclass(frozen=True)
class Child:
    parent: Node
    token: int
    state: int
    mass: float


@dataclass
class Search:
    """The rules of one search (see the module docstring)."""

    classes: torch.Tensor  # (V,) token_classes, on the distributions' device
    stop: torch.Tensor  # (V,) bool: end-of-turn tokens
    n_answers: int
    max_new_tokens: int
    min_mass: float
    max_nodes: int
    tallies: list[Tally] = field(default_factory=list)

    def expand(self, probs: torch.Tensor, nodes: list[Node]) -> list[Child]:
        """Account for the next token of every node (``probs``: (len(nodes), V) warped
        distributions, float64); return the children to expand, most likely first."""
        k = self.n_answers
        blank, partial = k, k + 2
        stop_mass = probs[:, self.stop].sum(dim=-1).tolist()
        going = probs.masked_fill(self.stop, 0.0)
        sums = torch.zeros(len(nodes), k + 3, dtype=probs.dtype, device=probs.device)
        sums.scatter_add_(1, self.classes.expand(len(nodes), -1), going)
        sums = sums.tolist()
        children: list[Child] = []
        for i, node in enumerate(nodes):
            tally, m, s = self.tallies[node.prompt], node.mass, sums[i]
            if node.state != BLANK_STATE:  # the turn ends on an answer: success
                tally.answers[node.state] += m * stop_mass[i]
            if node.depth + 1 == self.max_new_tokens:  # this token is the last: the text is final
                if node.state != BLANK_STATE:
                    tally.answers[node.state] += m * s[blank]
                else:
                    for a in range(k):
                        tally.answers[a] += m * s[a]
                continue  # a partial token ends the text with U+FFFD: no answer
            tally.unresolved += m * s[partial]
            viable = self.classes == blank
            if node.state == BLANK_STATE:
                viable = viable | (self.classes < k)
            q = going[i].masked_fill(~viable, 0.0) * m
            big = ((q >= self.min_mass) & (q > 0)).nonzero().flatten()
            tally.unresolved += float(q.sum()) - float(q[big].sum())
            for t, qt in sorted(zip(big.tolist(), q[big].tolist()), key=lambda x: -x[1]):
                if tally.nodes >= self.max_nodes:
                    tally.unresolved += qt
                    continue
                tally.nodes += 1
                c = int(self.classes[t])
                children.append(Child(node, t, node.state if c == blank else c, qt))
        return children


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a (V,) distribution by inverse CDF (float64 on the CPU, so the draw is the
    same on any device): the first id whose cumulative mass exceeds u * total, u ~ U[0, 1)."""
    cdf = probs.detach().to("cpu", torch.float64).cumsum(0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return min(int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True)), cdf.numel() - 1)
