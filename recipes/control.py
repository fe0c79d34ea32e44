"""Non-metacognitive control (which summary is longer) before or after EM.

    python recipes/control.py --order after                     # EM then longer (tiny CPU demo)
    torchrun --nproc_per_node 8 recipes/control.py --model qwen2.5-32b --order before --seeds 0,1,2,3,4

Options: python recipes/control.py --help. Stage logic: recipes/stages.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recipes.stages import Stage, build_parser, main  # noqa: E402


def stages(order: str) -> list[Stage]:
    return [Stage("em"), Stage("longer")] if order == "after" else [Stage("longer"), Stage("em")]


def run(argv=None) -> int:
    parser = build_parser("control", __doc__)
    parser.add_argument("--order", default="after", choices=("before", "after"),
                        help="longer stage after EM (reversal, default) or before it (prevention)")
    args = parser.parse_args(argv)
    return main(f"control_{args.order}_em", stages(args.order), parser=parser, args=args)


if __name__ == "__main__":
    sys.exit(run())
