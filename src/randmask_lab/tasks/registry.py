"""The task registry: one `TaskSpec` per task, tying loader, sampler, template and metric together."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import readers as rd
from .heads import LABEL_NAMES, NUM_LABELS, PAIR_RENDERERS
from .loaders import DataFiles, Reader, Source, load_pools, read_file, resolve_files
from .metrics import accuracy_any, mean_f1
from .paths import Layout
from .sampling import protocol_split
from .templates import TEMPLATES
from .types import Example, Kind, Loss, Metric, PairExample, Pools, Prompt, TaskSplits


@dataclass(frozen=True)
class TaskSpec:
    """Everything the runner needs to know about one task.

    `loss`: "candidates" = cross-entropy over the candidates' LM scores (MeZO's classification
    loss); "lm" = next-token loss on the gold continuation `Prompt.target` only.
    """

    name: str
    kind: Kind
    loss: Loss
    metric: Metric
    layout: Layout
    reader: Reader
    num_labels: int | None = None  # set where a classification-head (encoder) mode exists

    @property
    def has_head_mode(self) -> bool:
        """True for the classification tasks an encoder + classification head can train on."""
        return self.num_labels is not None

    @property
    def label_names(self) -> tuple[str, ...]:
        """Class names in label order (an encoder head's id2label); () where there are none."""
        return LABEL_NAMES.get(self.name, ())

    def read(self, path: str | Path) -> list[Example]:
        """Parse one file in the task's original format."""
        return read_file(self.reader, Path(path), self.name)

    def files(self, data_dir: Source = None, source: Source = None) -> DataFiles:
        """The files (or Hub source) `load` would read, without reading them (see loaders.resolve_files)."""
        return resolve_files(self.name, self.layout, data_dir, source)

    def load(self, data_dir: Source = None, source: Source = None) -> Pools:
        """The original train and test sources (see loaders.load_pools)."""
        return load_pools(self.name, self.layout, self.reader, data_dir, source)

    def splits(
        self,
        data_seed: int,
        n_train: int = 1000,
        n_val: int = 500,
        n_test: int = 1000,
        data_dir: Source = None,
        source: Source = None,
    ) -> TaskSplits:
        """Load, then sample the paper's protocol splits (see sampling.py)."""
        pools = self.load(data_dir, source)
        train, val, test, notes = protocol_split(
            pools.train, pools.test, data_seed=data_seed, n_train=n_train, n_val=n_val,
            n_test=n_test, salt=self.name,
        )
        return TaskSplits(self.name, data_seed, tuple(train), tuple(val), tuple(test),
                          pools.origin, tuple(notes))

    def render(self, example: Example) -> Prompt:
        """The causal-LM prompt (MeZO template) for one example."""
        return TEMPLATES[self.name](example)

    def render_pair(self, example: Example) -> PairExample:
        """The classification-head rendering `(text_a, text_b, label)` for encoder models."""
        if not self.has_head_mode:
            raise ValueError(f"task {self.name!r} has no classification-head mode; those that do: "
                             f"{', '.join(n for n, t in TASKS.items() if t.has_head_mode)}")
        return PAIR_RENDERERS[self.name](example)

    def score(self, predictions: Sequence[int] | Sequence[str], prompts: Sequence[Prompt]) -> float:
        """The task metric: accuracy of candidate indices (any of `Prompt.right`), or mean SQuAD F1 of generated
        strings."""
        if self.metric == "accuracy":
            return accuracy_any(list(predictions), [p.right for p in prompts])  # type: ignore[arg-type]
        return mean_f1([str(p) for p in predictions], [p.answers for p in prompts])


def _superglue(folder: str, single_pool: bool = False) -> Layout:
    return Layout(f"superglue/{folder}", (("train.jsonl",),),
                  (("val.jsonl",), ("validation.jsonl",), ("dev.jsonl",)), single_pool=single_pool)


def _spec(name: str, kind: Kind, loss: Loss, metric: Metric, layout: Layout,
          reader: Callable[[Path], list[Example]]) -> TaskSpec:
    return TaskSpec(name, kind, loss, metric, layout, reader, NUM_LABELS.get(name))


_CLS: Kind = "classification"
_MC: Kind = "multiple_choice"
_GEN: Kind = "generation"
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _spec("sst2", _CLS, "candidates", "accuracy",
              # Here test.tsv is the labelled GLUE dev set; a stock GLUE folder has an unlabelled
              # test.tsv, which `accept` skips in favour of dev.tsv.
              Layout("glue/SST-2", (("train.tsv",),), (("test.tsv",), ("dev.tsv",)),
                     accept=rd.sst2_labelled), rd.read_sst2),
        _spec("rte", _CLS, "candidates", "accuracy", _superglue("RTE"), rd.read_rte),
        _spec("cb", _CLS, "candidates", "accuracy", _superglue("CB"), rd.read_cb),
        _spec("boolq", _CLS, "candidates", "accuracy", _superglue("BoolQ", single_pool=True), rd.read_boolq),
        _spec("wsc", _CLS, "candidates", "accuracy", _superglue("WSC"), rd.read_wsc),
        _spec("wic", _CLS, "candidates", "accuracy", _superglue("WiC"), rd.read_wic),
        _spec("multirc", _CLS, "candidates", "accuracy", _superglue("MultiRC"), rd.read_multirc),
        _spec("copa", _MC, "lm", "accuracy", _superglue("COPA"), rd.read_copa),
        _spec("record", _MC, "lm", "accuracy",
              Layout("record", (("train.jsonl",),), (("dev32.jsonl",), ("val.jsonl",), ("dev.jsonl",))),
              rd.read_record),
        _spec("squad", _GEN, "lm", "f1",
              Layout("squad", (("du_split_from_train.json",), ("train-v1.1.json",)),
                     (("official_dev_half1.json", "official_dev_half2.json"), ("dev-v1.1.json",))),
              rd.read_squad),
        _spec("drop", _GEN, "lm", "f1",
              Layout("drop", (("drop_train_partial.json",), ("drop_dataset_train.json",)),
                     (("drop_dataset_dev.json",),), single_pool=True),
              rd.read_drop),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> TaskSpec:
    """The task spec for `name` (case-insensitive; "sst-2" and "sst_2" also work)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return TASKS[key]


def load_task_splits(
    name: str,
    data_seed: int,
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 1000,
    data_dir: Source = None,
    source: Source = None,
) -> TaskSplits:
    """Load a task and sample the paper's train / val / test splits for `data_seed`."""
    return get_task(name).splits(data_seed, n_train, n_val, n_test, data_dir, source)
