"""The experimental system: one run, sweeps, the results store, reports, the default main job.

Its sub-packages, by job (each imports only those before it in this list):

- ``compute``: how a run computes (device and processes, precision, quantization, the bf16 attention kernel);
- ``results``: what runs leave behind (``RunRecord``, ``ResultStore``, best-LR reports);
- ``run``: what a run is (``RunConfig``, its CLI options, the data it reads);
- ``parts``: building a run (``assemble(config) -> RunParts``; the analysis verbs' inputs);
- ``training``: training it (``run_training``, the loop, checkpoints);
- ``sweeps``: many runs (grids, the local and Ray executors, ``randmask main``).

The names below are the public entry points:

    from randmask_lab.experiment import RunConfig, run_training
    record = run_training(RunConfig(model="smollm2-135m", task="rte", method="randmask",
                                    trainable_ratio=1e-4, lr=1e-2, seed=0))
    print(record.status, record.test_metric)
"""

from randmask_lab.errors import RunError
from randmask_lab.experiment.parts.analysis_inputs import build_model_and_batches, describe_analysis_run
from randmask_lab.experiment.results.record import RunRecord, code_version
from randmask_lab.experiment.results.report import report, report_tables
from randmask_lab.experiment.results.store import ResultStore
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.sweeps.sweep import SweepConfig, default_lrs, run_sweep, sweep_configs
from randmask_lab.experiment.training.train import RunInterrupted, run_training

__all__ = [
    "ResultStore", "RunConfig", "RunError", "RunInterrupted", "RunRecord", "SweepConfig",
    "build_model_and_batches", "code_version", "default_lrs", "describe_analysis_run", "report", "report_tables",
    "run_sweep", "run_training", "sweep_configs",
]
