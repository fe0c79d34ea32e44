"""Decoder models (Qwen2 / Qwen2.5 and Seed-OSS) configured from HF checkpoints.

    model = engine.models.from_pretrained("Qwen/Qwen2.5-32B-Instruct", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids, position_ids=..., cu_seqlens=...)
"""

from kernels.attention import attention

from .config import SUPPORTED_ARCHITECTURES, ConfigError, ModelArgs
from .decoder import CausalLM
from .loading import CheckpointError, from_pretrained, load_safetensors
from .positions import position_ids_from_cu_seqlens
from .saving import SaveError, save_pretrained, write_hf_checkpoint

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "ModelArgs",
    "SaveError",
    "attention",
    "from_pretrained",
    "load_safetensors",
    "position_ids_from_cu_seqlens",
    "save_pretrained",
    "write_hf_checkpoint",
]
