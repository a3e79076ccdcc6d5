"""RunConfig: everything that defines one fine-tuning run. Field docstrings become the CLI's help."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from randmask_lab.errors import RunError

MASKING_METHODS = ("randmask", "structured")
# Fields that change how a run is executed or stored, not what it computes: left out of its id.
NON_IDENTITY = frozenset({
    "out_dir", "store", "progress", "resume", "checkpoint_every", "eval_batch_size", "device",
    "threads", "save_adapter", "data_dir", "max_steps",
})


@dataclass
class RunConfig:
    """One fine-tuning run: model x task x method x budget x learning rate x seeds."""

    model: str = "smollm2-135m"
    """Model: a short name (smollm2-135m, gemma3-270m, minilm-l6), a local model folder, or a Hub id."""
    task: str = "sst2"
    """Task: sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop."""
    method: str = "randmask"
    """Fine-tuning method: randmask, structured, full, lora, adalora, prefix, bitfit, adapter; zeroshot (no training,
    the untouched model is evaluated; prompt scoring only)."""
    ratio: float | None = None
    """Masking budget as a fraction of ALL model parameters (randmask/structured; the paper's 1e-5 is its
    0.001%). Default for masking methods: 1e-3."""
    density: float | None = None
    """Alternative masking budget: keep probability per targeted matrix (randmask/structured)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    head_lr: float | None = None
    """Learning rate of the task head (classification-head mode); default: the same as lr."""
    epochs: int = 5
    """Training epochs (the paper: 5)."""
    batch_size: int = 8
    """Examples per optimizer step and process (the paper: 8 per GPU)."""
    grad_accum: int = 1
    """Split each batch into this many micro-batches (same result, less memory)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up (the paper: constant)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    seed: int = 0
    """Default for the three seeds below."""
    data_seed: int | None = None
    """Seed of the train/val/test sampling (default: seed)."""
    mask_seed: int | None = None
    """Seed of the mask and of every random initialisation a method makes (default: seed)."""
    order_seed: int | None = None
    """Seed of the training order and dropout (default: seed)."""
    n_train: int = 1000
    """Training examples sampled from the original train split (the paper: 1000)."""
    n_val: int = 500
    """Validation examples sampled from the original train split (the paper: 500)."""
    n_test: int = 1000
    """Test examples, at most, sampled from the original validation split (the paper: 1000)."""
    mode: Literal["auto", "lm", "head"] = "auto"
    """lm: prompts scored by a causal LM; head: encoder + classification head; auto: from the model."""
    targets: list[str] | None = None
    """Modules to adapt (name suffixes) for randmask/structured/lora/adalora; default: query and value."""
    head_modules: list[str] | None = None
    """Task-head modules trained by every method (head mode); default: the model's classifier (+pooler)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Method-specific options, e.g. r=16 for lora (CLI: --option r=16, repeatable)."""
    max_length: int = 1024
    """Longest token sequence; longer contexts are cut from the left so the answer is kept."""
    max_new_tokens: int = 50
    """Greedy decoding length for generation tasks (SQuAD, DROP); decoding also stops at a newline."""
    select_by: Literal["val_loss", "val_metric"] = "val_loss"
    """How the best epoch is chosen; its weights give the reported test metric."""
    eval_initial: bool = False
    """Also evaluate before training (recorded as epoch 0, never selected)."""
    val_generate: bool = False
    """Generation tasks: also decode the validation set each epoch to get a validation F1 (slow)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model weight dtype."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available). Under torchrun each rank uses its local GPU."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    data_dir: str | None = None
    """Folder holding the original datasets (default: $RANDMASK_DATA_DIR or ../shared/data)."""
    source: str | None = None
    """Override the task's data: a file or task folder in the original format, or hf[:<dataset id>]."""
    out_dir: str = "runs"
    """Where run folders (checkpoints, logs, adapters) and the results store go."""
    store: str | None = None
    """SQLite results store (default: <out_dir>/results.sqlite)."""
    eval_batch_size: int = 16
    """Sequences per forward pass when evaluating."""
    checkpoint_every: int = 100
    """Checkpoint every this many optimizer steps and at each epoch's end; 0: epoch ends only; -1: never
    (a killed run then restarts). The checkpoint is deleted when the run ends."""
    resume: bool = True
    """Resume a killed run from its last checkpoint; skip a finished one."""
    save_adapter: bool = True
    """Save the trained adapter (randmask: save_adapter; peft: save_pretrained) in the run folder."""
    progress: bool = True
    """Show a progress bar."""
    max_steps: int | None = None
    """Stop each epoch early after this many steps (smoke tests only; not the protocol)."""

    def __post_init__(self) -> None:
        if self.method in MASKING_METHODS and self.ratio is None and self.density is None:
            self.ratio = 1e-3
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    def validate(self) -> None:
        """Raise RunError for values no run can use (names are checked when the run loads them)."""
        positive = {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "max_length": self.max_length,
                    "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if not value > 0:
                raise RunError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.batch_size % self.grad_accum:
            raise RunError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        if self.method not in MASKING_METHODS and (self.ratio is not None or self.density is not None):
            raise RunError(f"--ratio/--density apply to randmask and structured only, not {self.method!r}")
        if self.ratio is not None and self.density is not None:
            raise RunError("give --ratio or --density, not both")
        for name in ("ratio", "density"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise RunError(f"--{name} must be in (0, 1], got {value}")

    @property
    def seeds(self) -> tuple[int, int, int]:
        """(data_seed, mask_seed, order_seed) with defaults filled in."""
        pick = lambda s: self.seed if s is None else s
        return pick(self.data_seed), pick(self.mask_seed), pick(self.order_seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RunError(f"unknown RunConfig fields {unknown}: written by another randmask version?")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (seeds resolved)."""
        data = {k: v for k, v in self.to_dict().items() if k not in NON_IDENTITY}
        data["data_seed"], data["mask_seed"], data["order_seed"] = self.seeds
        data.pop("seed")
        return data

    @property
    def run_id(self) -> str:
        """Stable id: a readable prefix plus a hash of `identity()`."""
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]
        budget = f"-r{self.ratio:g}" if self.ratio is not None else (
            f"-d{self.density:g}" if self.density is not None else "")
        model = self.model.rstrip("/").rsplit("/", 1)[-1]
        return f"{model}-{self.task}-{self.method}{budget}-lr{self.lr:g}-s{self.seed}-{digest}"
