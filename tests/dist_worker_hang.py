"""torchrun worker for tests/test_faults.py: `python -m engine.train` whose rank 1 hangs before step 2.

    torchrun --nproc_per_node 2 tests/dist_worker_hang.py --config run.toml
"""

from __future__ import annotations

import sys
import time

from engine import train

_real_train_step = train.Trainer.train_step


def _train_step(self, step_samples):
    if self.dist.rank == 1 and self.step == 1:  # about to run step 2
        time.sleep(3600)
    return _real_train_step(self, step_samples)


if __name__ == "__main__":
    train.Trainer.train_step = _train_step
    sys.exit(train.main(sys.argv[1:]))
