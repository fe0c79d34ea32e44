"""Merge LoRA adapters into a base model and write a full HF checkpoint:
`python -m engine.merge --base MODEL --adapter STAGE1 [--adapter STAGE2 ...] --out DIR`.

This is how the paper chained stages (stage-1 LoRA merged into the base, stage 2 trained on the
result), and how a trained model is handed to vLLM or transformers. The alternative that writes
no 64 GB of weights is stacking (`stack_adapters` in the trainer). The two differ only by the
rounding of the merged weights to the checkpoint dtype: W + scaling·B·A is formed in fp32 and cast
once, so each merged bf16 weight is within half a bf16 ulp of the exact sum.

The tokenizer files of the base (tokenizer.json, tokenizer_config.json, …) are copied along.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from engine.assemble import torch_dtype
from engine.config import DTYPE_NAMES
from engine.errors import EngineError, report
from engine.lora import merge_lora_
from engine.models import from_pretrained, save_pretrained
from engine.models.loading import resolve_checkpoint_dir
from engine.outputs import check_output_dir
from engine.peft_format import load_peft_adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


def merge(base: str, adapters: list[str], out: str, *, dtype: str = "bfloat16", max_shard_size: str = "5GB",
          overwrite: bool = False) -> Path:
    base_dir = resolve_checkpoint_dir(base)
    model = from_pretrained(base_dir, dtype=torch_dtype(dtype))
    for path in adapters:
        config = load_peft_adapter(model, path)
        print(f"stacked {path}: r {config.r}, alpha {config.alpha}, rsLoRA {config.use_rslora}", file=sys.stderr)
    merged = merge_lora_(model)
    print(f"merged {len(adapters)} adapter(s) into {len(merged)} linear layers", file=sys.stderr)
    extra = [base_dir / name for name in TOKENIZER_FILES if (base_dir / name).is_file()]
    return save_pretrained(model, out, base_dir, max_shard_size=max_shard_size, overwrite=overwrite, extra_files=extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base checkpoint directory or hub id")
    p.add_argument("--adapter", required=True, action="append", help="PEFT adapter directory; repeat to merge a stack in order")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="dtype of the written weights (default bfloat16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    try:
        check_output_dir(args.out, "--out")  # before the weights are read, not after they are merged
        out = merge(args.base, args.adapter, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    overwrite=args.overwrite)
    except EngineError as e:
        return report(e)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
