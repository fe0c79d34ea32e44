"""Key/value cache for batched inference (``engine.generate``).

One preallocated buffer pair per layer, ``(batch, max_len, n_kv_heads, head_dim)`` in the model
dtype, plus the number of tokens each sequence (row) holds. Rows fill independently: row ``i``'s
tokens sit in slots ``0 .. lengths[i] - 1``; slots beyond are stale and always masked out.

A forward pass with a cache (``CausalLM.forward(..., cache=cache)``) is one of two kinds:

* **prefill**, padding-free: every row's prompt packed into one ``(1, total)`` row with
  ``cu_seqlens`` (sample ``j`` -> cache row ``j``; the cache must be empty). Attention is the
  ordinary varlen causal path (``kernels.attention.attention``), and each sample's keys and
  values are scattered into its row.
* **append** (decoding): ``input_ids`` ``(batch, s)``, ``s`` new tokens per row (1 when decoding),
  written after each row's cached tokens. Each query attends over its row's cached tokens and the
  new ones up to itself: SDPA with a boolean key-padding + causal mask (:func:`cached_attention`).

:meth:`KVCache.reserve` (called once per forward by ``Transformer.forward``) plans the pass: it
picks the slots, builds the mask once for all layers, returns the position ids and advances
``lengths``. Each ``Attention`` layer then calls :meth:`LayerCache.update_and_attend` on its own
layer's view. Finished sequences are dropped with :meth:`KVCache.keep` so that later passes do no
work for them. Inference only: no dropout here, and the model must be in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention import attention

from .positions import position_ids_from_cu_seqlens


@dataclass
class _Step:
    """Where one forward pass's tokens go, shared by all layers."""

    rows: torch.Tensor  # (tokens,) cache row of each input token, in input order
    slots: torch.Tensor  # (tokens,) slot (position in the row) of each input token
    cu_seqlens: torch.Tensor | None  # prefill: the packed row's boundaries
    kv_len: int = 0  # append: slots 0..kv_len-1 are read
    mask: torch.Tensor | None = None  # append: (batch, 1, s, kv_len) bool, True = attend


class KVCache:
    """Preallocated keys/values of ``batch`` sequences of up to ``max_len`` tokens each."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch {batch}, max_len {max_len}")
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # tokens held per row
        self._host_lengths = [0] * batch  # the same, on the host: planning a step needs no device sync
        self._step: _Step | None = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> KVCache:
        """An empty cache shaped for ``model`` (a ``CausalLM``), in its dtype and on its device."""
        args = model.args
        weight = model.model.embed_tokens.weight
        return cls(
            args.num_hidden_layers,
            batch,
            max_len,
            args.num_key_value_heads,
            args.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    @property
    def batch(self) -> int:
        return len(self._host_lengths)

    @property
    def host_lengths(self) -> list[int]:
        return list(self._host_lengths)

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def reserve(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Plan a forward pass over ``input_ids``: choose the slots its tokens are written to,
        advance ``lengths``, and return the tokens' position ids (as ``input_ids``' shape)."""
        device = self.lengths.device
        if cu_seqlens is not None:
            return self._reserve_prefill(input_ids, cu_seqlens)
        b, s = input_ids.shape
        if b != self.batch:
            raise ValueError(f"the cache holds {self.batch} sequences but the input has {b} rows")
        kv_len = max(self._host_lengths) + s
        if kv_len > self.max_len:
            raise ValueError(f"KV cache full: a row would need {kv_len} slots, the cache has {self.max_len}")
        positions = self.lengths[:, None] + torch.arange(s, device=device)  # (b, s)
        # Query at position p of row i sees the row's slots 0..p: cached tokens and new ones up to itself.
        mask = torch.arange(kv_len, device=device)[None, None, :] <= positions[:, :, None]  # (b, s, kv_len)
        rows = torch.arange(b, device=device).repeat_interleave(s)
        self._step = _Step(rows, positions.reshape(-1), None, kv_len, mask[:, None])
        self.lengths += s
        self._host_lengths = [n + s for n in self._host_lengths]
        return positions

    def _reserve_prefill(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        bounds = cu_seqlens.tolist()
        if input_ids.shape[0] != 1 or len(bounds) - 1 != self.batch:
            raise ValueError(
                f"a packed prefill needs one row with one sample per cache row ({self.batch}), got "
                f"{input_ids.shape[0]} row(s) and {len(bounds) - 1} sample(s)"
            )
        if any(self._host_lengths):
            raise ValueError("a packed prefill needs an empty cache; append to a filled cache with (batch, s) input_ids")
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if max(lengths) > self.max_len:
            raise ValueError(f"KV cache too short: a prompt has {max(lengths)} tokens, the cache {self.max_len}")
        positions = position_ids_from_cu_seqlens(cu_seqlens.to(self.lengths.device))  # (1, total)
        counts = torch.tensor(lengths, device=self.lengths.device)
        rows = torch.arange(self.batch, device=self.lengths.device).repeat_interleave(counts, output_size=bounds[-1])
        self._step = _Step(rows, positions[0], cu_seqlens)
        self.lengths += counts
        self._host_lengths = [n + m for n, m in zip(self._host_lengths, lengths)]
        return positions

    @torch.no_grad()
    def keep(self, rows: list[int] | torch.Tensor) -> None:
        """Keep only these rows (in this order), e.g. drop the sequences that finished."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        host = index.tolist()
        if not host:
            raise ValueError("KVCache.keep: keep at least one row")
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = self.lengths.index_select(0, index)
        self._host_lengths = [self._host_lengths[i] for i in host]
        self._step = None


class LayerCache:
    """One layer's view of a :class:`KVCache`, handed to that layer's ``Attention``."""

    def __init__(self, cache: KVCache, index: int):
        self.cache = cache
        self.index = index

    def update_and_attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> torch.Tensor:
        """Store this pass's ``k``, ``v`` (rotated) and return the attention output.

        q (b, s, nh, d); k, v (b, s, nkv, d) -> (b, s, nh, d), as ``attention.attention``.
        """
        step = self.cache._step
        if step is None:
            raise RuntimeError("KVCache: no pass planned; call the model with cache=... (it calls reserve)")
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        b, s, nkv, d = k.shape
        keys[step.rows, step.slots] = k.reshape(b * s, nkv, d).to(keys.dtype)
        values[step.rows, step.slots] = v.reshape(b * s, nkv, d).to(values.dtype)
        if step.cu_seqlens is not None:
            # Prefill: the rows were empty, so attention over the cache is exactly causal
            # attention within each packed sample — the existing varlen path.
            return attention(q, k, v, cu_seqlens=step.cu_seqlens, scale=scale)
        return cached_attention(q, keys[:, : step.kv_len], values[:, : step.kv_len], step.mask, scale=scale)


def cached_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Attention of new queries over cached keys/values.

    q (b, s, nh, d); keys, values (b, kv_len, nkv, d); mask (b, 1, s, kv_len) bool, True where a
    query may attend (each query sees at least itself). Returns (b, s, nh, d).

    GQA without copying the cache: the g = nh / nkv query heads that share a KV head (query head
    h reads KV head h // g, as HF's repeat_kv) are folded into the query length, so SDPA sees
    (b, nkv, g * s, d) queries against (b, nkv, kv_len, d) keys on any backend.
    """
    b, s, nh, d = q.shape
    kv_len, nkv = keys.shape[1], keys.shape[2]
    g = nh // nkv
    q = q.view(b, s, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, nkv, g * s, d)
    mask = mask[:, :, None].expand(b, 1, g, s, kv_len).reshape(b, 1, g * s, kv_len)
    out = F.scaled_dot_product_attention(
        q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale
    )  # (b, nkv, g * s, d)
    return out.view(b, nkv, g, s, d).permute(0, 3, 1, 2, 4).reshape(b, s, nh, d)
