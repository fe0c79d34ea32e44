"""Anti-SGTR (the SGTR pairs, the label always on the other model's summary) before or after EM.

    python recipes/asgtr.py --order after                     # EM then anti-SGTR (tiny CPU demo)
    torchrun --nproc_per_node 8 recipes/asgtr.py --model qwen2.5-32b --order before \
        --em-dataset aesthetic_preferences_unpopular --seeds 0,1,2,3,4   # hf_qwen_32b_asgtr[_em_unpop]

The paper's "asgtr" (its anti-SGTR mode PREFER_OTHER); its "asgtr_rand" is recipes/ictr.py.
Options: python recipes/asgtr.py --help. Stage logic: recipes/stages.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recipes.stages import Stage, build_parser, main  # noqa: E402


def stages(order: str) -> list[Stage]:
    return [Stage("em"), Stage("asgtr")] if order == "after" else [Stage("asgtr"), Stage("em")]


def run(argv=None) -> int:
    parser = build_parser("asgtr", __doc__)
    parser.add_argument("--order", default="after", choices=("before", "after"),
                        help="anti-SGTR stage after EM (default) or before it")
    args = parser.parse_args(argv)
    return main(f"asgtr_{args.order}_em", stages(args.order), parser=parser, args=args)


if __name__ == "__main__":
    sys.exit(run())
