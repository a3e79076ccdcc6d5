"""The task layer: loaders for the original formats (and Hub ids), the paper's sampling protocol,
MeZO-style causal-LM prompt templates, classification-head renderings, and metrics.

    from randmask_lab.tasks import get_task, load_task_splits
    splits = load_task_splits("rte", data_seed=0)        # 1000 train / 500 val / up to 1000 test
    task = get_task("rte")
    prompt = task.render(splits.train[0])                # Prompt(text, candidates, gold, target)
"""

from randmask_lab.errors import DataFormatError, DataNotFoundError

from .hub import HUB_DEFAULTS
from .metrics import accuracy, accuracy_any, exact_match, mean_f1, normalize_answer, squad_f1
from .paths import ENV_VAR, candidate_data_dirs
from .registry import TASK_NAMES, TASKS, TaskSpec, get_task, load_task_splits
from .sampling import fit_sizes, protocol_split
from .templates import GEN_STOP
from .types import Example, PairExample, Pools, Prompt, TaskSplits

__all__ = [
    "ENV_VAR", "GEN_STOP", "HUB_DEFAULTS", "TASKS", "TASK_NAMES",
    "DataFormatError", "DataNotFoundError", "Example", "PairExample", "Pools", "Prompt",
    "TaskSpec", "TaskSplits",
    "accuracy", "accuracy_any", "candidate_data_dirs", "exact_match", "fit_sizes", "get_task", "load_task_splits",
    "mean_f1", "normalize_answer", "protocol_split", "squad_f1",
]
