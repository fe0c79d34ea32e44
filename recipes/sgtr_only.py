"""SGTR only: self-recognition finetuning alone.

    python recipes/sgtr_only.py                                   # tiny CPU demo (a few minutes)
    torchrun --nproc_per_node 8 recipes/sgtr_only.py --model qwen2.5-32b --seeds 0,1,2,3,4

Options: python recipes/sgtr_only.py --help. Stage logic: recipes/stages.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recipes.stages import Stage, main  # noqa: E402

STAGES = [Stage("sgtr")]


if __name__ == "__main__":
    sys.exit(main("sgtr_only", STAGES, description=__doc__))
