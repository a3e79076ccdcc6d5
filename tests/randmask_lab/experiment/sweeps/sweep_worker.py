"""A `randmask sweep` worker process for the two-worker tests: ``python sweep_worker.py <sweep args>``.

RANDMASK_TEST_STEP_SLEEP=<seconds> makes every training step sleep that long, so a test can kill the
worker (kill -9) in the middle of a run.
"""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":
    from randmask_lab.cli import main
    from randmask_lab.experiment.training.loop import Trainer

    pause = float(os.environ.get("RANDMASK_TEST_STEP_SLEEP", "0"))
    if pause:
        step = Trainer.step

        def slow_step(self, indices):  # noqa: ANN001
            time.sleep(pause)
            return step(self, indices)

        Trainer.step = slow_step
    sys.exit(main(sys.argv[1:]))
