"""The files of a RandMask PEFT adapter: what ``save_pretrained`` seals and ``from_pretrained`` verifies.

PEFT writes ``adapter_model.safetensors`` and then ``adapter_config.json`` into one folder. The config
of a randmask adapter carries, besides PEFT's fields, per masked module an indices checksum and a base
fingerprint (recorded at injection), the SHA-256 of the weights file (recorded when the config is
saved beside it) and a checksum of its own randmask fields. Loading runs the checks of
``randmask.load_adapter``: the config is read with the bounded reader and its fields' types checked,
its own checksum must hold, the weights file must be a regular file no larger than the masks drawn on
this base need, match its checksum, parse, and hold exactly the expected tensors; masks and base
fingerprints are checked at injection (``randmask.peft``). A config without these checksums (written
by hand, or by an older randmask) is refused unless the caller opts out by name.
No peft import here: ``randmask.peft`` wires these functions into the PEFT classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from randmask.config import MaskingError
from randmask.files import atomic_write_bytes, file_size, parse_json, read_limited
from randmask.warn import warn_caller

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 64 << 20  # ~100 bytes of checksums per masked module: far above any real model's config
OPT_OUT = "randmask_allow_unverified"  # the from_pretrained keyword that loads a config without checksums
# How PeftModel.from_pretrained skips the base-fingerprint check alone (named in its refusal).
VERIFY_OPT_OUT = "randmask_verify_base=False to PeftModel.from_pretrained"
# The fields the config checksum covers: randmask's own, whose every value changes what is loaded. PEFT's
# bookkeeping (inference_mode, peft_version, base_model_name_or_path, auto_mapping ...) is left out.
SEALED = ("peft_type", "target_modules", "trainable_ratio", "density", "mask_kind", "seed", "modules_to_save",
          "total_params", "mask_kind_version", "checksums", "weights_sha256")
_FIX = "Re-save the adapter with save_pretrained"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return (isinstance(x, float) and math.isfinite(x)) or _is_int(x)


def _str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _checksums(x: Any) -> bool:
    return isinstance(x, dict) and all(
        isinstance(k, str) and isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
        and isinstance(v[1], dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in v[1].items())
        for k, v in x.items())


# field -> (check, what it must be); None is allowed for every field but peft_type, mask_kind and seed.
_FIELDS = {
    "peft_type": (lambda x: x == "RANDMASK", "'RANDMASK'"),
    "target_modules": (lambda x: isinstance(x, str) or _str_list(x), "a module name, regex or list of names"),
    "trainable_ratio": (_number, "a number"),
    "density": (_number, "a number"),
    "mask_kind": (lambda x: isinstance(x, str), "a string"),
    "seed": (lambda x: _is_int(x) and x >= 0, "an int >= 0"),
    "modules_to_save": (_str_list, "a list of module names"),
    "total_params": (lambda x: _is_int(x) and x > 0, "a positive int"),
    "mask_kind_version": (lambda x: _is_int(x) and x >= 1, "an int >= 1"),
    "checksums": (_checksums, "{module: [indices checksum, {dtype: fingerprint}]}"),
    "weights_sha256": (lambda x: isinstance(x, str) and len(x) == 64, "a SHA-256 hex digest"),
    "partition": (lambda x: isinstance(x, list) and len(x) == 2 and all(_is_int(v) for v in x) and 0 <= x[0] < x[1],
                  "[k, n] with 0 <= k < n"),
    "config_sha256": (lambda x: isinstance(x, str) and len(x) == 64, "a SHA-256 hex digest"),
    "task_type": (lambda x: isinstance(x, str), "a string"),
    "base_model_name_or_path": (lambda x: isinstance(x, str), "a string"),
    "revision": (lambda x: isinstance(x, str), "a string"),
    "peft_version": (lambda x: isinstance(x, str), "a string"),
    "inference_mode": (lambda x: isinstance(x, bool), "true or false"),
    "auto_mapping": (lambda x: isinstance(x, dict), "an object"),
}
_REQUIRED = ("peft_type", "mask_kind", "seed")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of a RandMask adapter: bounded, strict JSON, every known field of the right type."""
    data = parse_json(read_limited(path, MAX_CONFIG_BYTES, "PEFT adapter config", fix=_FIX + "."), str(path),
                      "PEFT adapter config", fix=_FIX + ".")
    check_config_data(data, str(path))
    return data


def guard_peft_type(original: Callable[..., str]) -> Callable[..., str]:
    """Wrap PEFT's ``PeftConfig._get_peft_type``, the first reader of every adapter config (it picks the config
    class): a local config is read through randmask's bounded reader first, so a FIFO, a symlink to /dev/zero or
    a huge file is refused unread, and text that is not JSON is a MaskingError (a ValueError, as peft's own
    JSONDecodeError is) for every adapter type. A RandMask config is then checked field by field; any other
    adapter's config goes on to peft's own reader unchanged."""
    def _get_peft_type(cls: type, model_id: str, **kwargs: Any) -> str:
        path = Path(model_id, kwargs.get("subfolder") or "", CONFIG_NAME)
        if not (path.exists() or path.is_symlink()):
            return original(cls, model_id, **kwargs)  # a Hub id: peft downloads the file
        blob = read_limited(path, MAX_CONFIG_BYTES, "PEFT adapter config", fix="pass an adapter folder written by "
                            "save_pretrained")
        try:
            loose = json.loads(blob.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise MaskingError(f"{path} is not valid JSON ({type(e).__name__}); it is not a PEFT adapter config. "
                               "Re-save the adapter with save_pretrained.") from None
        if isinstance(loose, dict) and loose.get("peft_type") == "RANDMASK":
            check_config_data(parse_json(blob, str(path), "PEFT adapter config", fix=_FIX + "."), str(path))
            return "RANDMASK"
        return original(cls, model_id, **kwargs)

    _get_peft_type.randmask_guard = True  # type: ignore[attr-defined]
    return _get_peft_type


def check_config_data(data: Any, where: str) -> None:
    """MaskingError naming the first field of ``data`` that a RandMask config cannot hold."""
    if not isinstance(data, dict):
        raise MaskingError(f"{where} holds a {type(data).__name__}, not a PEFT adapter config object. {_FIX}.")
    for key, (ok, want) in _FIELDS.items():
        if key not in data:
            if key in _REQUIRED:
                raise MaskingError(f"{where} lacks {key!r}; the adapter config is truncated or edited. {_FIX}.")
            continue
        value = data[key]
        if (value is not None or key in _REQUIRED) and not ok(value):
            raise MaskingError(f"{where}: {key} is {str(value)[:60]!r}; it must be {want}. The adapter config is "
                               f"damaged or edited. {_FIX}.")


def config_checksum(data: dict[str, Any]) -> str:
    """SHA-256 of the sealed fields' canonical JSON."""
    body = {k: data.get(k) for k in SEALED}
    for optional in ("partition", "exclude_modules"):  # sealed when set; left out at None so older checksums stand
        if data.get(optional) is not None:
            body[optional] = data[optional]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _without_base_weights(weights: Path, blob: bytes) -> bytes:
    """``blob`` (the weights file PEFT just wrote) without base-layer tensors, rewritten atomically if it had any.

    PEFT's ``save_embedding_layers="auto"`` saves the whole base weight of a targeted ``lm_head`` / ``embed_tokens``
    (for LoRA's resized vocabularies). A randmask adapter never loads a base weight (its loader refuses one: it
    would overwrite the base), so the file could not be loaded, and an ``lm_head`` weight is MBs to GBs."""
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError):
        return blob  # not ours to judge here: the loader names a damaged file
    base = sorted(key for key in tensors if ".base_layer." in key)
    if not base:
        return blob
    warn_caller(f"PEFT saved base weights {base[:3]} beside the adapter (save_embedding_layers='auto' does so when "
                f"an embedding layer such as lm_head is a target); a randmask adapter never loads base weights, so "
                f"they are left out of {weights}. Pass save_embedding_layers=False to skip this.")
    blob = st_save({k: v for k, v in tensors.items() if k not in base}, metadata={"format": "pt"})
    atomic_write_bytes(weights, blob)
    return blob


def seal(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The integrity fields of a config about to be written into ``folder`` beside its weights file (from which
    base-layer tensors PEFT saved are dropped first: ``_without_base_weights``)."""
    weights = folder / WEIGHTS_NAME
    size = file_size(weights)
    _refuse_pickled_save(folder, weights if size is not None else None)
    digest = None
    if size is not None:
        blob = _without_base_weights(weights, read_limited(weights, size, "PEFT adapter weights"))
        digest = hashlib.sha256(blob).hexdigest()
    sealed = {**data, "weights_sha256": digest}
    return {"weights_sha256": digest, "config_sha256": config_checksum(sealed)}


def _refuse_pickled_save(folder: Path, weights: Path | None) -> None:
    """MaskingError when the save that is sealing wrote ``adapter_model.bin`` (``safe_serialization=False``): a
    pickle randmask never loads, and a safetensors file left beside it by an earlier save would be sealed instead."""
    pickled = folder / PICKLED_WEIGHTS_NAME
    if not pickled.is_file():
        return
    if weights is not None and os.stat(weights).st_mtime_ns > os.stat(pickled).st_mtime_ns:
        return  # an older save's pickle; this save wrote the safetensors file
    raise MaskingError(f"save_pretrained wrote {pickled}, a pickle (safe_serialization=False); randmask adapters are "
                       "saved and loaded as safetensors only, so the adapter config was not written (the folder "
                       "keeps its earlier save, if any). Save again without safe_serialization=False.")


def check_sealed(data: dict[str, Any], where: str, allow_unverified: bool) -> bool:
    """True when ``data`` carries checksums that hold; MaskingError when they do not, or when they are missing and
    the caller did not opt out (False then: load unverified)."""
    missing = [k for k in ("checksums", "weights_sha256", "config_sha256", "total_params") if data.get(k) is None]
    if missing:
        if allow_unverified:
            return False
        raise MaskingError(f"{where} has no {', '.join(missing)}: nothing ties it to its weights file or its base "
                           "model, so another base, a merged base or an edited seed would load silently. Re-save "
                           f"the adapter with this randmask, or pass {OPT_OUT}=True to PeftModel.from_pretrained to "
                           "load it unverified.")
    if config_checksum(data) != data["config_sha256"]:
        raise MaskingError(f"{where} does not match its own config_sha256: the config was edited or damaged "
                           f"(e.g. its seed or a checksum changed). {_FIX}.")
    return True


def resolve_weights(folder: Path) -> Path:
    """The safetensors weights file of an adapter folder (a pickled adapter_model.bin is refused, never read)."""
    path = folder / WEIGHTS_NAME
    if not path.exists() and (folder / PICKLED_WEIGHTS_NAME).exists():
        raise MaskingError(f"{folder} holds {PICKLED_WEIGHTS_NAME}, a pickle; randmask never loads pickles. Save the "
                           "adapter with save_pretrained(..., safe_serialization=True).")
    return path


def read_weights(path: Path, max_bytes: int, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of the weights file: bounded by ``max_bytes`` (what this base's masks need), checked against
    ``sha256`` when the config recorded one, parsed into tensors (a damaged file is a MaskingError)."""
    blob = read_limited(path, max_bytes, "RandMask adapter weights", fix="it does not belong to this adapter "
                        f"config and base model. {_FIX}.")
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise MaskingError(f"{path} does not match the weights_sha256 in {CONFIG_NAME}: the file is truncated, "
                           f"corrupt, edited or from another save. {_FIX}.")
    try:
        return st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise MaskingError(f"{path} is not a readable safetensors file ({str(e)[:80]}). {_FIX}.") from None


def weights_limit(values: int, extra_params: int, tensors: int) -> int:
    """Bytes a weights file may take: ``values`` masked entries and ``extra_params`` modules_to_save parameters
    at up to 8 bytes each, plus the safetensors header (well under 1 KB per tensor)."""
    return 8 * (values + extra_params) + 1024 * (tensors + 1) + 8


def weights_file(path: str, subfolder: str | None, kwargs: dict[str, Any]) -> Path:
    """The adapter's safetensors file: in the local folder, else fetched from the Hub (as peft would, cached)."""
    folder = Path(path, subfolder or "")
    if folder.is_dir():
        return resolve_weights(folder)
    import inspect

    from huggingface_hub import hf_hub_download

    hub = {k: v for k, v in kwargs.items() if k in inspect.signature(hf_hub_download).parameters}
    try:
        return Path(hf_hub_download(path, WEIGHTS_NAME, subfolder=subfolder, **hub))
    except Exception as e:  # noqa: BLE001 - any download failure: say which file and why, in one line
        raise MaskingError(f"cannot fetch {WEIGHTS_NAME} of {path} ({type(e).__name__}); randmask loads adapter "
                           "weights from safetensors only.") from None


def _modules_to_save_params(model: nn.Module, names: list[str] | None) -> dict[str, torch.Tensor]:
    """{parameter name: parameter} of the modules ``modules_to_save`` names (peft matches name suffixes)."""
    if not names:
        return {}
    return {f"{m}.{p}": t for m, module in model.named_modules() if m and any(m.endswith(n) for n in names)
            for p, t in module.named_parameters(recurse=True)}


def check_weights_file(model: nn.Module, config: Any, plan: dict, load: dict[str, Any]) -> None:
    """The weights file holds exactly this adapter's tensors: bounded by the masks just drawn, checksummed, parsed,
    every name expected (a tensor named like a base weight would overwrite it), every values vector whole."""
    extra = _modules_to_save_params(model, config.modules_to_save)
    nnz = {name: indices.numel() for name, (indices, _) in plan.items()}
    limit = weights_limit(sum(nnz.values()), sum(t.numel() for t in extra.values()), len(nnz) + len(extra))
    tensors = read_weights(load["weights"], limit, config.weights_sha256 if load["verified"] else None)
    prefix = "base_model.model."
    values = {f"{prefix}{name}.randmask_adapters.values": n for name, n in nnz.items()}
    allowed = set(values) | {prefix + k for k in extra}
    unexpected, missing = sorted(set(tensors) - allowed), sorted(set(values) - set(tensors))
    if unexpected or missing:
        raise MaskingError(f"{load['weights']} holds {unexpected[:3]} and lacks {missing[:3]}: it does not belong to "
                           "this adapter config (a tensor named like a base weight would overwrite it). Re-save the "
                           "adapter with save_pretrained.")
    for key, t in tensors.items():
        want = (values[key],) if key in values else tuple(extra[key.removeprefix(prefix)].shape)
        if not t.is_floating_point() or tuple(t.shape) != want or not torch.isfinite(t).all():
            raise MaskingError(f"{load['weights']}: {key} must be {want} finite floats, got {t.dtype} of shape "
                               f"{tuple(t.shape)}. The adapter file is corrupt: re-save it.")


__all__ = ["CONFIG_NAME", "OPT_OUT", "SEALED", "VERIFY_OPT_OUT", "WEIGHTS_NAME", "check_config_data",
           "check_sealed", "check_weights_file", "config_checksum", "guard_peft_type", "read_config", "read_weights",
           "resolve_weights", "seal", "weights_file", "weights_limit"]
