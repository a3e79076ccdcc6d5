"""RunConfig: everything that defines one fine-tuning run. Field docstrings become the CLI's help."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from randmask import MaskingConfig, MaskingError
from randmask_lab.argtypes import bounds_problem, type_problem
from randmask_lab.errors import RunError
from randmask_lab.experiment.compute.distributed import launcher_world_size, parse_device
from randmask_lab.experiment.compute.precision import AUTO, PRECISIONS, Precision, resolve_precision
from randmask_lab.experiment.compute.quantize import FSDP_SCHEMES, QUANTIZE_METHODS, QUANTIZE_SCHEMES, Quantize
from randmask_lab.experiment.run.options import FLAGS, SET_BY_RUNNER
from randmask_lab.experiment.run.untrained import untrained_problem

MASKING_METHODS = ("randmask", "structured")


class Seeds(NamedTuple):
    """A run's three independent seeds (each defaults to ``--seed``)."""

    data: int
    """The train/val/test sample."""
    mask: int
    """The mask and every random initialisation a method makes."""
    order: int
    """The training order and dropout."""

# Every field carries its role in its metadata: "identity" fields change what a run computes or reads
# and go into its id; "execution" fields change only how or where it runs. A field without a role is an
# error (tests/randmask_lab/experiment/run/test_identity.py), so a new option cannot silently stay out of the id.
ROLE = "role"
IDENTITY = {ROLE: "identity"}
EXECUTION = {ROLE: "execution"}
# The budget's name in RunConfig's dict form (config.json, records, study specs, the run id's hash): its name
# before it became ``trainable_ratio``, kept so every stored record and run id stays valid.
STORED_NAMES = {"trainable_ratio": "ratio"}


@dataclass
class RunConfig:
    """One fine-tuning run: model x task x method x budget x learning rate x seeds."""

    model: str = field(default="smollm2-135m", metadata=IDENTITY)
    """Model: a short name (smollm2-135m, gemma3-270m, minilm-l6), a local model folder, or a Hub id."""
    task: str = field(default="sst2", metadata=IDENTITY)
    """Task: sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop."""
    method: str = field(default="randmask", metadata=IDENTITY)
    """Fine-tuning method: randmask, structured, full, lora, adalora, prefix, bitfit, adapter; zeroshot (no training,
    the untouched model is evaluated; prompt scoring only)."""
    trainable_ratio: float | None = field(default=None, metadata={**IDENTITY, FLAGS: ("--ratio",)})
    """Masking budget as a fraction of ALL model parameters (randmask/structured; the paper's 1e-5 is its
    0.001%; --ratio is the same option). Default for masking methods: 1e-3."""
    density: float | None = field(default=None, metadata=IDENTITY)
    """Alternative masking budget: keep probability per targeted matrix (randmask/structured)."""
    lr: float = field(default=1e-3, metadata=IDENTITY)
    """Peak learning rate (AdamW)."""
    head_lr: float | None = field(default=None, metadata=IDENTITY)
    """Learning rate of the task head (classification-head mode); default: the same as lr."""
    epochs: int = field(default=5, metadata=IDENTITY)
    """Training epochs (the paper: 5)."""
    batch_size: int = field(default=8, metadata=IDENTITY)
    """Examples per optimizer step and process (the paper: 8 per GPU)."""
    grad_accum: int = field(default=1, metadata=IDENTITY)
    """Split each batch into this many micro-batches (same result, less memory)."""
    group_by_length: bool = field(default=False, metadata=IDENTITY)
    """Batch examples of similar length together (transformers' group_by_length): less padding, same epochs."""
    weight_decay: float = field(default=0.0, metadata=IDENTITY)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=IDENTITY)
    """AdamW betas."""
    adam_eps: float = field(default=1e-8, metadata=IDENTITY)
    """AdamW epsilon."""
    max_grad_norm: float | None = field(default=None, metadata=IDENTITY)
    """Clip the gradient's global L2 norm to this before each step (transformers' max_grad_norm, whose Trainer
    clips at 1.0 by default); default: no clipping, as the paper states none."""
    schedule: Literal["constant", "linear", "cosine"] = field(default="constant", metadata=IDENTITY)
    """Learning-rate schedule after warm-up (the paper: constant)."""
    warmup_steps: int = field(default=0, metadata=IDENTITY)
    """Linear warm-up steps."""
    seed: int = field(default=0, metadata=IDENTITY)
    """Default for the three seeds below."""
    data_seed: int | None = field(default=None, metadata=IDENTITY)
    """Seed of the train/val/test sampling (default: seed)."""
    mask_seed: int | None = field(default=None, metadata=IDENTITY)
    """Seed of the mask and of every random initialisation a method makes (default: seed)."""
    order_seed: int | None = field(default=None, metadata=IDENTITY)
    """Seed of the training order and dropout (default: seed)."""
    n_train: int = field(default=1000, metadata=IDENTITY)
    """Training examples sampled from the original train split (the paper: 1000)."""
    n_val: int = field(default=500, metadata=IDENTITY)
    """Validation examples sampled from the original train split (the paper: 500)."""
    n_test: int = field(default=1000, metadata=IDENTITY)
    """Test examples, at most, sampled from the original validation split (the paper: 1000)."""
    mode: Literal["auto", "lm", "head"] = field(default="auto", metadata=IDENTITY)
    """lm: prompts scored by a causal LM; head: encoder + classification head; auto: from the model."""
    targets: list[str] | None = field(default=None, metadata=IDENTITY)
    """Modules to adapt (name suffixes) for randmask/structured/lora/adalora; default: query and value."""
    head_modules: list[str] | None = field(default=None, metadata=IDENTITY)
    """Task-head modules trained by every method (head mode); default: the model's classifier (+pooler)."""
    method_options: dict[str, Any] = field(default_factory=dict, metadata=IDENTITY)
    """Method-specific options, e.g. r=16 for lora (CLI: --option r=16, repeatable)."""
    max_length: int = field(default=1024, metadata=IDENTITY)
    """Longest token sequence; longer contexts are cut from the left so the answer is kept."""
    max_new_tokens: int = field(default=50, metadata=IDENTITY)
    """Greedy decoding length for generation tasks (SQuAD, DROP); decoding also stops at a newline."""
    select_by: Literal["val_loss", "val_metric"] = field(default="val_loss", metadata=IDENTITY)
    """How the best epoch is chosen; its weights give the reported test metric."""
    eval_initial: bool = field(default=False, metadata=IDENTITY)
    """Also evaluate before training (recorded as epoch 0, never selected)."""
    val_generate: bool = field(default=False, metadata=IDENTITY)
    """Generation tasks: also decode the validation set each epoch to get a validation F1 (slow)."""
    precision: Precision = field(default="auto", metadata=IDENTITY)
    """Numeric precision (Lightning's names): auto (bf16-mixed where the device runs bf16 natively: a GPU, or a CPU
    with AMX/avx512_bf16; else 32); 32; bf16-mixed (bf16 autocast, fp32 weights and optimizer state); bf16-true
    (bf16 base weights, fp32 trainable tensors where the method keeps them: randmask values, adapters); 16-mixed
    (fp16 autocast with loss scaling). The run records, and is identified by, the precision auto resolved to."""
    precision_requested: str | None = field(default=None, metadata={**EXECUTION, SET_BY_RUNNER: True})
    """Set by the runner: the --precision that was asked for (auto, or a name), beside the one that ran."""
    world_size: int = field(default_factory=launcher_world_size, metadata={**IDENTITY, SET_BY_RUNNER: True})
    """Set from the launcher: the processes the run spans (torchrun's WORLD_SIZE; 1 without one). Each process
    takes --batch-size examples a step, so a step sees batch_size x world_size of them, and several processes drop
    the ragged last batch: the same options on 2 processes are another run than on 1."""
    quantize: Quantize = field(default="none", metadata=IDENTITY)
    """Frozen base stored quantized, QLoRA-style (causal LMs; randmask, structured, lora, zeroshot): nf4 / fp4
    (bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8), ao-int8 (torchao int8 weight-only), ao-int4 (torchao
    int4 weight-only: CUDA only), ao-nf4 (torchao NF4Tensor, torchtune's QLoRA base; the one --fsdp shards); none:
    float weights. Needs the 'quantized' extra."""
    device: str = field(default="auto", metadata=EXECUTION)
    """cpu, cuda, cuda:N, or auto (cuda when available). Under torchrun each rank uses its local GPU."""
    threads: int | None = field(default=None, metadata=EXECUTION)
    """torch CPU threads (default: torch's choice)."""
    fsdp: bool = field(default=False, metadata=EXECUTION)
    """Under torchrun: shard the model across the processes with FSDP2 (fully_shard per decoder layer, then the
    root) instead of replicating it with DDP, for models that outgrow one device. randmask/structured only, on a
    float or --quantize ao-nf4 base. Its checkpoints gather the sharded values and AdamW moments (rank 0 writes),
    and a restart gives each rank its shard back."""
    data_dir: str | None = field(default=None, metadata=EXECUTION)
    """Folder holding the original datasets (default: $RANDMASK_DATA_DIR or ../shared/data)."""
    source: str | None = field(default=None, metadata=IDENTITY)
    """Override the task's data: a file or task folder in the original format, or hf[:<dataset id>]."""
    out_dir: str = field(default="runs", metadata=EXECUTION)
    """Where run folders (checkpoints, logs, adapters) and the results store go."""
    store: str | None = field(default=None, metadata=EXECUTION)
    """SQLite results store (default: <out_dir>/results.sqlite)."""
    eval_batch_size: int = field(default=16, metadata=EXECUTION)
    """Sequences per forward pass when evaluating."""
    checkpoint_every: int = field(default=100, metadata=EXECUTION)
    """Checkpoint every this many optimizer steps and at each epoch's end; 0: epoch ends only; -1: never
    (a killed run then restarts). The checkpoint is deleted when the run ends."""
    restart: bool = field(default=False, metadata=EXECUTION)
    """Discard this run's checkpoint and stored result and run it again (default: resume a killed run from its
    last checkpoint; hand back a finished one)."""
    lease_seconds: float = field(default=60.0, metadata=EXECUTION)
    """A worker's claim on a run expires this long after its last heartbeat (sent every quarter of it); another
    worker sharing the store then takes the run over and resumes it from its checkpoint."""
    save_adapter: bool = field(default=True, metadata=EXECUTION)
    """Save the trained adapter (randmask: save_adapter; peft: save_pretrained) in the run folder."""
    progress: bool = field(default=True, metadata=EXECUTION)
    """Show a progress bar."""
    max_steps: int | None = field(default=None, metadata=IDENTITY)
    """Stop each epoch early after this many steps (smoke tests only; not the protocol; part of the run id)."""

    def __post_init__(self) -> None:
        if self.method in MASKING_METHODS and self.trainable_ratio is None and self.density is None:
            self.trainable_ratio = 1e-3
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    def validate(self) -> None:
        """Raise RunError for values no run can use (names are checked when the run loads them)."""
        if problem := type_problem(self):  # before any comparison: a JSON spec's "5" would raise TypeError
            raise RunError(problem)
        checks: list[tuple[str, object, bool, str]] = [
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("head-lr", self.head_lr, self.head_lr is None or self.head_lr > 0, "> 0"),
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("grad-accum", self.grad_accum, self.grad_accum >= 1, ">= 1"),
            ("weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("adam-betas", list(self.adam_betas),
             len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "two numbers in [0, 1)"),
            ("adam-eps", self.adam_eps, self.adam_eps > 0, "> 0"),
            ("max-grad-norm", self.max_grad_norm, self.max_grad_norm is None or self.max_grad_norm > 0, "> 0"),
            ("warmup-steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0"),
            ("n-train", self.n_train, self.n_train >= 1, ">= 1"),
            ("n-val", self.n_val, self.n_val >= 1, ">= 1"),
            ("n-test", self.n_test, self.n_test >= 0, ">= 0"),
            ("max-length", self.max_length, self.max_length >= 2, ">= 2"),
            ("max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("eval-batch-size", self.eval_batch_size, self.eval_batch_size >= 1, ">= 1"),
            ("checkpoint-every", self.checkpoint_every, self.checkpoint_every >= -1, ">= -1"),
            ("threads", self.threads, self.threads is None or self.threads >= 1, ">= 1"),
            ("max-steps", self.max_steps, self.max_steps is None or self.max_steps >= 1, ">= 1"),
            ("lease-seconds", self.lease_seconds, self.lease_seconds > 0, "> 0"),
            ("world-size", self.world_size, self.world_size >= 1, ">= 1"),
        ]
        for seed in ("seed", "data_seed", "mask_seed", "order_seed"):
            value = getattr(self, seed)
            checks.append((seed.replace("_", "-"), value, value is None or value >= 0, ">= 0"))
        for f in dataclasses.fields(self):  # a JSON spec's "false" (a string) would silently be true
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise RunError(f"--{f.name.replace('_', '-')} must be true or false, got {value!r}")
        for name, value, ok, want in checks:
            if not ok or value != value:  # value != value: NaN
                raise RunError(f"--{name} must be {want}, got {value}")
        if problem := bounds_problem(self):  # inf, lr 1e308, seed 1e23, lease 0.05 s (argtypes.py)
            raise RunError(problem)
        self._check_choices()

    def _check_generation_options(self) -> None:
        """RunError for a generation option on a task that generates nothing (it was accepted, made a new run id,
        and trained and scored exactly as without it)."""
        from randmask_lab.tasks import TASKS  # here: the task registry imports nothing of the run's

        spec = TASKS.get(self.task)
        if spec is None or spec.kind == "generation":
            return
        if self.val_generate:
            raise RunError(f"--val-generate scores generated answers on validation; {self.task} is a {spec.kind} task "
                           "and generates none. Drop it")
        if self.max_new_tokens != RunConfig.max_new_tokens:
            raise RunError(f"--max-new-tokens bounds generated answers; {self.task} is a {spec.kind} task and "
                           "generates none. Drop it")

    def _check_choices(self) -> None:
        """RunError for a precision, quantization or budget the run's method cannot use."""
        if self.precision not in (AUTO, *PRECISIONS):
            raise RunError(f"--precision must be one of {AUTO}, {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size % self.grad_accum:
            raise RunError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        if self.quantize not in QUANTIZE_SCHEMES:
            raise RunError(f"--quantize must be one of {', '.join(QUANTIZE_SCHEMES)}, got {self.quantize!r}")
        if self.quantize != "none" and self.method not in QUANTIZE_METHODS:
            raise RunError(f"--quantize {self.quantize} works with {', '.join(QUANTIZE_METHODS)}, not {self.method!r} "
                           "(it trains or wraps base weights that are stored quantized); use --quantize none")
        if self.fsdp and self.quantize not in FSDP_SCHEMES:
            raise RunError(f"--fsdp cannot shard a --quantize {self.quantize} base: bitsandbytes weights lose their "
                           "quantization under fully_shard, and torchao 0.18's Int8Tensor cannot be split. Use "
                           "--quantize ao-nf4 (torchao's NF4Tensor, as torchtune's QLoRA-FSDP2), or drop --fsdp.")
        self._check_generation_options()
        if problem := untrained_problem(self):
            raise RunError(problem)
        if self.method not in MASKING_METHODS and (self.trainable_ratio is not None or self.density is not None):
            raise RunError(f"--ratio/--density apply to randmask and structured only, not {self.method!r}")
        if self.method in MASKING_METHODS:
            try:  # the budget's rule is the library's (randmask.MaskingConfig): checked there, once
                MaskingConfig(trainable_ratio=self.trainable_ratio, density=self.density)
            except MaskingError as e:
                raise RunError(f"--trainable-ratio (--ratio) / --density: {e}") from None

    @property
    def ratio(self) -> float | None:
        """The former name of ``trainable_ratio`` (still the key in config.json, records and study specs)."""
        return self.trainable_ratio

    @ratio.setter
    def ratio(self, value: float | None) -> None:
        self.trainable_ratio = value

    @property
    def device_type(self) -> str:
        """``cpu`` or ``cuda``: the kind of device the run uses (``auto``: cuda when available)."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return parse_device(self.device).type

    def resolved(self) -> RunConfig:
        """This config with ``precision`` resolved for its device (``auto`` -> bf16-mixed or 32), the request
        kept in ``precision_requested``: what a run records and hashes."""
        if self.precision != AUTO:
            return self if self.precision_requested is not None else dataclasses.replace(
                self, precision_requested=self.precision)
        return dataclasses.replace(self, precision=resolve_precision(AUTO, self.device_type),
                                   precision_requested=AUTO)

    @property
    def seeds(self) -> Seeds:
        """The three seeds with defaults filled in: ``seeds.data``, ``seeds.mask``, ``seeds.order``."""
        pick = lambda s: self.seed if s is None else s
        return Seeds(pick(self.data_seed), pick(self.mask_seed), pick(self.order_seed))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field, in field order, under its stored name (``trainable_ratio`` -> ``ratio``)."""
        data = {STORED_NAMES.get(k, k): v for k, v in dataclasses.asdict(self).items()}
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of ``to_dict``; unknown keys are an error. Reads config.json files of older versions
        (``dtype`` -> ``precision``, ``resume`` -> ``restart``)."""
        data = dict(data)
        if "dtype" in data:
            data.setdefault("precision", LEGACY_DTYPES.get(data.pop("dtype"), "32"))
        if "resume" in data:
            data.setdefault("restart", not data.pop("resume"))
        for name, stored in STORED_NAMES.items():
            if stored in data:
                if data.get(name) is not None:
                    raise RunError(f"give {name} or its former name {stored}, not both")
                data[name] = data.pop(stored)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RunError(f"unknown RunConfig fields {unknown}: written by another randmask version?")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """What defines the run's result: every "identity" field (seeds resolved) and the data read.

        ``data`` is the fingerprint of the task's original files (name, size, SHA-256 of each) or
        the Hub dataset id, so a different copy of the data, or an edited file, is a different run.
        ``model_files`` does the same for a local model folder (``sources.model_fingerprint``).
        ``mask_kind_version`` is the sampler version of a masking method whose draws have changed
        (``randmask.masks.MASK_KIND_VERSIONS``): a record of the old sampler is another run.
        """
        from randmask import MASK_KIND_VERSIONS
        from randmask_lab.experiment.run.sources import data_fingerprint, model_fingerprint
        from randmask_lab.methods import MASK_KIND_OF

        data = {STORED_NAMES.get(f.name, f.name): v for f, v in zip(dataclasses.fields(self), self.to_dict().values(),
                                                                     strict=True) if field_role(f) == "identity"}
        # auto is never an identity: two machines may resolve it differently (see resolved()).
        data["precision"] = resolve_precision(self.precision, self.device_type)
        data["data_seed"], data["mask_seed"], data["order_seed"] = self.seeds
        data.pop("seed")
        for name, default in OMITTED_AT_DEFAULT.items():  # fields added after records existed
            if data[name] == default:
                data.pop(name)
        data["data"] = data_fingerprint(self.task, self.data_dir, self.source)
        model_files = model_fingerprint(self.model)
        if model_files is not None:  # a local folder: its files, not only its path (a zoo name or Hub id: the name)
            data["model_files"] = model_files
        kind = MASK_KIND_OF.get(self.method)
        if kind is not None and MASK_KIND_VERSIONS[kind] > 1:  # above 1 only: older run ids stay valid
            data["mask_kind_version"] = MASK_KIND_VERSIONS[kind]
        if self.source is not None and "hub" not in data["data"]:
            data["source"] = "local"  # a file or folder: its fingerprint is the identity, not where it lies
        return data

    @property
    def run_id(self) -> str:
        """Stable id: a readable prefix plus a hash of `identity()`."""
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]
        budget = f"-r{self.trainable_ratio:g}" if self.trainable_ratio is not None else (
            f"-d{self.density:g}" if self.density is not None else "")
        model = self.model.rstrip("/").rsplit("/", 1)[-1]
        return f"{model}-{self.task}-{self.method}{budget}-lr{self.lr:g}-s{self.seed}-{digest}"


# Identity fields added after studies had committed records: left out of the identity at their
# default, so every run id made before they existed stays the same.
OMITTED_AT_DEFAULT: dict[str, Any] = {"group_by_length": False, "quantize": "none", "max_grad_norm": None,
                                       "world_size": 1}

LEGACY_DTYPES = {"float32": "32", "bfloat16": "bf16-true", "float16": "16-mixed"}


def _accept_former_names(init: Any) -> Any:
    """``RunConfig(ratio=...)``, the budget's former name, keeps working (``ratio`` given wins over the field)."""

    @functools.wraps(init)
    def __init__(self: RunConfig, *args: Any, **kwargs: Any) -> None:
        for name, stored in STORED_NAMES.items():
            if stored in kwargs:
                kwargs[name] = kwargs.pop(stored)
        init(self, *args, **kwargs)

    return __init__


RunConfig.__init__ = _accept_former_names(RunConfig.__init__)  # type: ignore[method-assign]


def field_role(f: dataclasses.Field) -> str:
    """ "identity" or "execution"; a RunError for a field that has neither (classify every new field)."""
    role = f.metadata.get(ROLE)
    if role not in ("identity", "execution"):
        raise RunError(f"RunConfig field {f.name!r} has no role: give it metadata=IDENTITY (changes what the run "
                       "computes or reads) or metadata=EXECUTION (only how or where it runs)")
    return role
