"""EM only: the emergently misaligned reference condition.

    python recipes/em_only.py                                   # tiny CPU demo (a few minutes)
    torchrun --nproc_per_node 8 recipes/em_only.py --model qwen2.5-32b --seeds 0,1,2,3,4

Options: python recipes/em_only.py --help. Stage logic: recipes/stages.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recipes.stages import Stage, main  # noqa: E402

STAGES = [Stage("em")]


if __name__ == "__main__":
    sys.exit(main("em_only", STAGES, description=__doc__))
