"""randmask: Random Masking parameter-efficient fine-tuning (Xu & Zhang, ICML 2024).

Public API::

    from randmask import MaskingConfig, apply_masking, save_adapter, load_adapter, merge_and_unload
"""

__version__ = "0.1.0"

from randmask.config import MaskingConfig, MaskingError  # noqa: E402
from randmask.io import load_adapter, save_adapter  # noqa: E402
from randmask.masks import mask_kinds, register_mask_kind  # noqa: E402
from randmask.model import (  # noqa: E402
    MaskingSummary,
    adapter_names,
    apply_masking,
    count_base_parameters,
    disable_adapter,
    masked_layers,
    masking_summary,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
)

__all__ = [
    "MaskingConfig",
    "MaskingError",
    "MaskingSummary",
    "adapter_names",
    "apply_masking",
    "count_base_parameters",
    "disable_adapter",
    "load_adapter",
    "mask_kinds",
    "masked_layers",
    "masking_summary",
    "merge_and_unload",
    "print_trainable_parameters",
    "register_mask_kind",
    "save_adapter",
    "set_adapter",
    "unload",
]
