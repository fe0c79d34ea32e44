"""SGTR then EM: does self-recognition finetuning first prevent emergent misalignment?

    python recipes/sgtr_prevent.py                                   # tiny CPU demo (a few minutes)
    torchrun --nproc_per_node 8 recipes/sgtr_prevent.py --model qwen2.5-32b --seeds 0,1,2,3,4

Options: python recipes/sgtr_prevent.py --help. Stage logic: recipes/stages.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recipes.stages import Stage, main  # noqa: E402

STAGES = [Stage("sgtr"), Stage("em")]


if __name__ == "__main__":
    sys.exit(main("sgtr_prevent", STAGES, description=__doc__))
