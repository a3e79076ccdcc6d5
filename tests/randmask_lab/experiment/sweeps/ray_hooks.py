"""Set up every Ray worker of the Ray executor tests (runtime_env worker_process_setup_hook).

With RANDMASK_TEST_HOOK_DIR set, each training step writes the worker's pid to ``<dir>/<run id>.pid``
(so a test can kill -9 the worker that runs a cell), and sleeps 0.5 s while ``<dir>/slow`` exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def install() -> None:
    from randmask_lab.experiment.training.loop import Trainer

    folder = os.environ.get("RANDMASK_TEST_HOOK_DIR")
    if not folder:
        return
    step = Trainer.step

    def traced_step(self, indices):  # noqa: ANN001
        Path(folder, f"{self.config.run_id}.pid").write_text(str(os.getpid()))
        if Path(folder, "slow").exists():
            time.sleep(0.5)
        return step(self, indices)

    Trainer.step = traced_step
