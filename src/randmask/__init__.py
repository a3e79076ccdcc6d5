"""randmask: Random Masking parameter-efficient fine-tuning (Xu & Zhang, ICML 2024).

The library: torch + safetensors only (``import randmask`` never imports transformers, peft
or the lab). Public API::

    from randmask import MaskingConfig, apply_masking, save_adapter, load_adapter, merge_and_unload

Everything in ``__all__`` is public and stable; so are the names in each submodule's own
``__all__`` (``randmask.ops``: the sparse op; ``randmask.targets``: the target tables). The lab
(``randmask_lab``) uses nothing else.

Quantized bases (bitsandbytes 4/8-bit, torchao weight-only) are adapted through the delta path
(``randmask.delta``): the stored weight stays quantized and is never written; see ``randmask.quantized``.

With peft installed, ``import randmask.peft`` registers randmask as a PEFT method
(``get_peft_model(model, RandMaskConfig(...))``) and adds SHiRA export/import.
"""

from randmask.adapter import MaskAdapter
from randmask.adapter_files import read_adapter_files
from randmask.config import MaskingConfig, MaskingError
from randmask.files import (
    atomic_target,
    atomic_write_bytes,
    file_size,
    loads_strict,
    open_limited,
    parse_json,
    read_json_limited,
    read_limited,
)
from randmask.io import load_adapter, save_adapter
from randmask.layer import MaskedLayer
from randmask.masks import MASK_KIND_VERSIONS, mask_kinds, register_mask_kind
from randmask.merge import COMBINATION_TYPES, add_weighted_adapter
from randmask.mixed import BASE_ADAPTER
from randmask.model import apply_masking, delete_adapter, disable_adapter, mixed_batch, set_adapter
from randmask.quantized import (
    disable_bnb_cpu_repacking,
    is_quantized,
    layer_bytes,
    logical_numel,
    quant_scheme,
    stored_shape,
)
from randmask.registry import adapter_names, masked_layers
from randmask.summary import MaskingSummary, count_base_parameters, masking_summary, print_trainable_parameters
from randmask.targets import TARGET_SETS, Target, architecture_targets, default_targets, resolve_targets
from randmask.unwrap import merge_and_unload, unload
from randmask.version import __version__

__all__ = [
    "BASE_ADAPTER",
    "COMBINATION_TYPES",
    "TARGET_SETS",
    "MaskAdapter",
    "MaskedLayer",
    "MASK_KIND_VERSIONS",
    "MaskingConfig",
    "MaskingError",
    "MaskingSummary",
    "Target",
    "__version__",
    "adapter_names",
    "add_weighted_adapter",
    "apply_masking",
    "architecture_targets",
    "atomic_target",
    "atomic_write_bytes",
    "count_base_parameters",
    "default_targets",
    "delete_adapter",
    "disable_adapter",
    "disable_bnb_cpu_repacking",
    "file_size",
    "is_quantized",
    "layer_bytes",
    "load_adapter",
    "loads_strict",
    "logical_numel",
    "mask_kinds",
    "masked_layers",
    "masking_summary",
    "merge_and_unload",
    "mixed_batch",
    "open_limited",
    "parse_json",
    "print_trainable_parameters",
    "quant_scheme",
    "read_adapter_files",
    "read_json_limited",
    "read_limited",
    "register_mask_kind",
    "resolve_targets",
    "save_adapter",
    "set_adapter",
    "stored_shape",
    "unload",
]
