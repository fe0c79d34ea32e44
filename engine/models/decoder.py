"""The decoder-only transformer shared by Qwen2 (Qwen2.5) and Seed-OSS.

Reads top to bottom: the args (``ModelArgs``, parsed from HF's config.json in ``config.py``),
then modules from small to large: RMSNorm, rotary embedding, Attention, MLP (SwiGLU),
DecoderLayer, Transformer, CausalLM; weight init is ``CausalLM.init_weights``. Inference threads an
optional KV cache (``kv_cache.py``) through the forwards; training never passes one.

Module and parameter names equal HF's state-dict keys (``model.embed_tokens.weight``,
``model.layers.0.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``), so
checkpoints load by name and LoRA adapters map 1:1 onto PEFT's names. Projections are plain
``nn.Linear`` so a LoRA wrapper can replace them by module name.

Numerics follow transformers' modeling_qwen2.py / modeling_seed_oss.py op for op (RMSNorm in
fp32, RoPE tables in fp32 cast to the activation dtype, same op order), which gives fp32 parity
within 1e-5. The ops with a Triton kernel (RMSNorm, RoPE, attention, SwiGLU, the loss) are called
through their dispatch functions in ``kernels/``, which choose the kernel or torch; RMSNorm and
SwiGLU keep less for backward than autograd through transformers' ops would, and the adapters
rebuild their inputs in backward instead of holding them (``saved_tensors.py``). No distributed
code lives here.

Shape legend: b batch, s sequence, h hidden_size, nh query heads, nkv key/value heads,
d head_dim, i intermediate_size, v vocab_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention
from kernels.cross_entropy import linear_cross_entropy
from kernels.rms_norm import rms_norm
from kernels.rope import rope
from kernels.swiglu import swiglu

from .config import ModelArgs
from .kv_cache import KVCache, LayerCache
from .positions import position_ids_from_cu_seqlens
from .saved_tensors import recompute_saved


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF: normalise in fp32, cast back to the input dtype, then scale by the weight (so a
        # bf16 model multiplies in bf16). Saves x and the fp32 rstd only.
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions. Holds no parameters.

    ``inv_freq`` is a non-persistent fp32 buffer: absent from checkpoints, so after building on
    the meta device and ``to_empty`` it holds garbage until :meth:`reset_inv_freq` runs
    (``CausalLM.init_buffers`` does that).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._compute_inv_freq(), persistent=False)

    def _compute_inv_freq(self) -> torch.Tensor:
        # HF's compute_default_rope_parameters, on the CPU in fp32 like HF does at init. (d/2,)
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device="cpu") / self.head_dim
        return 1.0 / (self.theta**exponents)

    def reset_inv_freq(self) -> None:
        # Always fp32, whatever dtype the model was cast to.
        self.inv_freq = self._compute_inv_freq().to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (b, s) -> cos, sin (b, s, d), computed in fp32 then cast, as HF.
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (b, s, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.attention_dropout = args.attention_dropout
        self.residual_dropout = args.residual_dropout
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=args.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=args.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape  # x (b, s, h)
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # (b, s, nh, d)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # (b, s, nkv, d)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # (b, s, nkv, d)
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # cos, sin (b, s, d) broadcast over heads
        if cache is not None:
            # Inference: store k, v in the KV cache and attend over the row's cached tokens.
            out = cache.update_and_attend(q, k, v, scale=self.head_dim**-0.5)  # (b, s, nh, d)
        else:
            out = attention(
                q,
                k,
                v,
                cu_seqlens=cu_seqlens,
                dropout_p=self.attention_dropout if self.training else 0.0,
                scale=self.head_dim**-0.5,
            )  # (b, s, nh, d)
        out = self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))  # (b, s, h)
        # Seed-OSS drops out the attention branch before the residual add (0.0 for Qwen2).
        return F.dropout(out, p=self.residual_dropout, training=self.training)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=args.mlp_bias)
        self.residual_dropout = args.residual_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # (b, s, i)
        m = swiglu(gate, up)  # keeps gate and up for backward
        with recompute_saved(m, swiglu, gate, up):  # down_proj's adapters rebuild their input from them
            out = self.down_proj(m)  # (b, s, h)
        # Seed-OSS drops out the MLP branch before the residual add (0.0 for Qwen2).
        return F.dropout(out, p=self.residual_dropout, training=self.training)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        # The adapters of the projections rebuild their input (a norm's output) in backward from
        # what the norm saved, rather than keeping it (saved_tensors.py).
        norm = self.input_layernorm
        normed = norm(x)
        with recompute_saved(normed, norm.forward, x):
            x = x + self.self_attn(normed, cos, sin, cu_seqlens, cache)
        norm = self.post_attention_layernorm
        normed = norm(x)
        with recompute_saved(normed, norm.forward, x):
            return x + self.mlp(normed)


class Transformer(nn.Module):
    """HF's ``model.`` submodule: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        # input_ids (b, s) -> final normalised hidden states (b, s, h)
        if cache is not None:
            # Picks the cache slots of these tokens; their positions continue each cached row.
            cache_positions = cache.reserve(input_ids, cu_seqlens)
            if position_ids is None:
                position_ids = cache_positions
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = position_ids_from_cu_seqlens(cu_seqlens)
            else:
                b, s = input_ids.shape
                position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self.embed_tokens(input_ids)  # (b, s, h)
        # One cos/sin table for all layers, as HF.
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (b, s, d) each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cu_seqlens, None if cache is None else cache.layer(i))
        return self.norm(x)


class LMHead(nn.Linear):
    """The output projection (``lm_head.weight``, (v, h), no bias). ``forward(hidden)`` gives the
    logits; ``forward(hidden, targets)`` the training loss: the fused linear cross-entropy
    (``kernels/cross_entropy.py``), which never makes the logits. The loss is computed in this
    module's call rather than by reading ``self.weight`` from outside, so that a wrapper's hooks see
    every use of the weight: FSDP2 (``engine/parallel.py``) gives the LM head its own group, which
    all-gathers the weight for this call and frees it right after."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets)


class CausalLM(nn.Module):
    """Transformer + LM head, mirroring HF's ``*ForCausalLM``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Transformer(args)
        self.lm_head = LMHead(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config ties them.

        Call again after ``to_empty``, which replaces each parameter separately and so unties them.
        """
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (rotary inv_freq), e.g. after ``to_empty``."""
        self.model.rotary_emb.reset_inv_freq()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init, HF's scheme: N(0, initializer_range) for linear and embedding weights,
        zero biases and padding row, ones for the norms."""
        std = self.args.initializer_range
        embed = self.model.embed_tokens
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight is not embed.weight:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.normal_(embed.weight, mean=0.0, std=std)
        if embed.padding_idx is not None:
            embed.weight[embed.padding_idx].zero_()
        self.init_buffers()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_hidden: bool = False,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (b, s) -> logits (b, s, v), or the final normed hidden states (b, s, h) when
        ``return_hidden``.

        ``logits_at`` (k,): indices into the b·s positions taken in row-major order; only their
        hidden states go through the LM head and the logits (k, v) are returned (inference: a
        prompt's last position). Inside ``forward`` for the same reason as the loss: under FSDP
        the LM head's weight is whole only during the model's forward.

        With ``targets`` (b, s) — the next token each position must predict, -100 where not
        trained — returns instead the fp32 *sum* of the token losses over trained positions
        (the trainer divides by its own token count). Only trained rows go through the LM head.
        The loss is computed in the LM head's call (:class:`LMHead`) so that FSDP's hooks see it.

        position_ids (b, s) default to 0..s-1 per row, or restart per sample when ``cu_seqlens``
        (packed row, b == 1; see ``attention.py``) is given.

        With a ``cache`` (inference, eval mode; see ``kv_cache.py``): a packed row with
        ``cu_seqlens`` prefills an empty cache, sample j into cache row j; otherwise row i's
        tokens are appended to cache row i and attend over everything cached before them.
        position_ids then default to each row's cached length onwards.
        """
        if cache is not None and (self.training or targets is not None):
            raise ValueError("the KV cache is for inference: call model.eval() and pass no targets")
        hidden = self.model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, cache=cache)
        if targets is not None:
            return self.lm_head(hidden, targets)
        if logits_at is not None:
            return self.lm_head(hidden.reshape(-1, hidden.shape[-1])[logits_at])
        if return_hidden:
            return hidden
        return self.lm_head(hidden)
