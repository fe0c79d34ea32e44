"""Model arguments, parsed and validated from a checkpoint's Hugging Face ``config.json``.

Two HF architectures share one decoder (``engine.models.decoder``); they differ only in a few
flags, all captured here:

* ``Qwen2ForCausalLM`` (Qwen2.5): bias on q/k/v, none on o_proj or the MLP, no residual dropout,
  ``head_dim = hidden_size / num_attention_heads`` unless the config names one.
* ``SeedOssForCausalLM`` (Seed-OSS): q/k/v bias from ``attention_bias``, o_proj bias from
  ``attention_out_bias``, MLP bias from ``mlp_bias``, an explicit ``head_dim`` (128 in
  Seed-OSS-36B, which is not hidden/heads), and ``attention_dropout`` + ``residual_dropout``.

Defaults for absent keys are the HF config classes' defaults (transformers' ``Qwen2Config`` /
``SeedOssConfig``), so a config.json means the same thing here as in transformers. The core
dimensions have no default: a config without them is broken, and guessing would only produce a
shape error later. Features these checkpoints do not use (RoPE scaling, sliding-window
attention, quantization) raise ``NotImplementedError`` rather than being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError


# HF architecture name -> HF model_type.
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "SeedOssForCausalLM": "seed_oss",
}

_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# Defaults of the optional keys, copied from transformers' Qwen2Config / SeedOssConfig.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "Qwen2ForCausalLM": {
        "num_key_value_heads": 32,
        "head_dim": None,  # Qwen2Attention: getattr(config, "head_dim", hidden // heads)
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "pad_token_id": None,
    },
    "SeedOssForCausalLM": {
        "num_key_value_heads": 8,
        "head_dim": 128,  # SeedOssConfig: an explicit null falls back to hidden // heads
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_dropout": 0.1,
        "residual_dropout": 0.1,
        "attention_bias": True,
        "attention_out_bias": False,
        "mlp_bias": False,
        "pad_token_id": 1,
    },
}

# transformers' RotaryEmbeddingConfigMixin.default_theta, used when a config names no rope_theta.
_DEFAULT_ROPE_THETA = 10_000.0


@dataclass(frozen=True)
class ModelArgs:
    """Everything the decoder needs to build itself; field names follow HF's config keys."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool  # bias on q_proj, k_proj, v_proj
    attention_out_bias: bool  # bias on o_proj
    mlp_bias: bool  # bias on gate_proj, up_proj, down_proj
    attention_dropout: float  # on attention probabilities, training mode only
    residual_dropout: float  # on the o_proj and down_proj outputs, training mode only
    tie_word_embeddings: bool
    pad_token_id: int | None  # nn.Embedding padding_idx, as in HF
    initializer_range: float

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Parse an HF ``config.json`` dict (both the transformers 4.x and 5.x layouts)."""
        architecture = _architecture(config)
        cfg = {**_HF_DEFAULTS[architecture], **config}

        missing = [key for key in _REQUIRED_KEYS if cfg.get(key) is None]
        if missing:
            raise ConfigError(f"{architecture} config is missing required key(s): {', '.join(missing)}")
        if cfg["hidden_act"] != "silu":
            raise NotImplementedError(
                f"hidden_act={cfg['hidden_act']!r}: only 'silu' (SwiGLU MLP) is implemented"
            )
        if cfg.get("quantization_config") is not None:
            raise NotImplementedError(
                "quantized checkpoints (config has quantization_config) are not supported; "
                "use a bf16/fp16/fp32 checkpoint"
            )
        _reject_sliding_window(cfg)

        num_attention_heads = cfg["num_attention_heads"]
        # Both HF configs map an explicit null to "same as the query heads" / "hidden // heads".
        num_key_value_heads = cfg["num_key_value_heads"] or num_attention_heads
        head_dim = cfg["head_dim"] or cfg["hidden_size"] // num_attention_heads

        if architecture == "Qwen2ForCausalLM":
            # Qwen2 hard-codes its biases (q/k/v only) and has no residual dropout.
            attention_bias, attention_out_bias, mlp_bias, residual_dropout = True, False, False, 0.0
        else:
            attention_bias = cfg["attention_bias"]
            attention_out_bias = cfg["attention_out_bias"]
            mlp_bias = cfg["mlp_bias"]
            residual_dropout = cfg["residual_dropout"]

        return cls(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            rope_theta=_rope_theta(cfg),
            attention_bias=bool(attention_bias),
            attention_out_bias=bool(attention_out_bias),
            mlp_bias=bool(mlp_bias),
            attention_dropout=float(cfg["attention_dropout"]),
            residual_dropout=float(residual_dropout),
            tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
            pad_token_id=cfg["pad_token_id"],
            initializer_range=float(cfg["initializer_range"]),
        )


def _architecture(config: dict[str, Any]) -> str:
    """The supported architecture a config names, checked against its model_type."""
    supported = ", ".join(f"{arch} (model_type {mt!r})" for arch, mt in SUPPORTED_ARCHITECTURES.items())
    architectures = config.get("architectures")
    model_type = config.get("model_type")

    if architectures:
        known = [arch for arch in architectures if arch in SUPPORTED_ARCHITECTURES]
        if len(known) != 1:
            raise ConfigError(f"unsupported architectures {architectures}; supported: {supported}")
        architecture = known[0]
        if model_type is not None and model_type != SUPPORTED_ARCHITECTURES[architecture]:
            raise ConfigError(
                f"config names architecture {architecture} but model_type {model_type!r} "
                f"(expected {SUPPORTED_ARCHITECTURES[architecture]!r})"
            )
        return architecture

    for architecture, supported_type in SUPPORTED_ARCHITECTURES.items():
        if model_type == supported_type:
            return architecture
    raise ConfigError(
        f"unsupported model (architectures={architectures}, model_type={model_type!r}); supported: {supported}"
    )


def _rope_theta(cfg: dict[str, Any]) -> float:
    """RoPE base, following transformers' convert_rope_params_to_dict.

    transformers 4.x configs carry ``rope_theta`` at top level plus an optional ``rope_scaling``
    dict; 5.x configs carry ``rope_parameters = {"rope_type", "rope_theta"}``. A ``rope_scaling``
    dict takes precedence over ``rope_parameters``, and a theta inside the dict over the top-level
    one. Only plain ("default") RoPE is implemented.
    """
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if any(isinstance(value, dict) for value in rope.values()):
        raise NotImplementedError(f"per-layer-type RoPE parameters are not supported: {rope}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(
            f"rope_type {rope_type!r} (RoPE scaling) is not implemented; only plain 'default' RoPE is supported"
        )
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise NotImplementedError(f"partial_rotary_factor={partial} is not supported")
    return float(rope.get("rope_theta") or cfg.get("rope_theta") or _DEFAULT_ROPE_THETA)


def _reject_sliding_window(cfg: dict[str, Any]) -> None:
    """Every layer here uses full causal attention; refuse configs that ask for a window.

    Qwen2.5 configs carry ``sliding_window`` and ``max_window_layers`` but disable them with
    ``use_sliding_window: false`` (transformers then ignores the window), so only the switch and
    explicit per-layer types matter.
    """
    if cfg.get("use_sliding_window"):
        raise NotImplementedError(
            "use_sliding_window=true: sliding-window attention is not implemented "
            "(Qwen2.5 checkpoints ship with it disabled)"
        )
    layer_types = cfg.get("layer_types") or []
    if any(layer_type != "full_attention" for layer_type in layer_types):
        raise NotImplementedError(f"only full_attention layers are supported, config has layer_types={layer_types}")
