"""ICTR (identity confusion: SGTR pairs with uninformative labels) before or after EM.

    python recipes/ictr.py --order after                     # EM then ictr (tiny CPU demo)
    torchrun --nproc_per_node 8 recipes/ictr.py --model qwen2.5-32b --order before --seeds 0,1,2,3,4

Options: python recipes/ictr.py --help. Stage logic: recipes/stages.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recipes.stages import Stage, build_parser, main  # noqa: E402


def stages(order: str) -> list[Stage]:
    return [Stage("em"), Stage("ictr")] if order == "after" else [Stage("ictr"), Stage("em")]


def run(argv=None) -> int:
    parser = build_parser("ictr", __doc__)
    parser.add_argument("--order", default="after", choices=("before", "after"),
                        help="ictr stage after EM (reversal, default) or before it (prevention)")
    args = parser.parse_args(argv)
    return main(f"ictr_{args.order}_em", stages(args.order), parser=parser, args=args)


if __name__ == "__main__":
    sys.exit(run())
