"""randmask's registration as the PEFT method ``"RANDMASK"`` (``randmask.peft`` calls ``register`` on import).

How randmask registers (``register``; needs peft >= 0.21, no upper bound): first through peft's public
``peft.utils.register_peft_method``, for a peft that accepts the name. peft 0.21 refuses names outside
its ``PeftType`` enum, and an external package cannot add enum members cleanly; but ``PeftType`` is a
``str`` enum and every lookup (``PEFT_TYPE_TO_CONFIG_MAPPING[config.peft_type]`` and the tuner and
prefix mappings) is a plain dict keyed by it, so the plain string ``"RANDMASK"`` is a valid key that
round-trips through ``adapter_config.json``. ``register`` then writes the three mappings after the same
checks ``register_peft_method`` makes, finding them by name: a peft without them is a MaskingError naming
the version that has them. tests/randmask/test_peft.py checks the route against the installed peft.
"""

from __future__ import annotations

import itertools

import peft
from peft.config import PeftConfigMixin

from randmask.config import MaskingError
from randmask.peft_files import guard_peft_type
from randmask.warn import warn_caller


class _PeftTypeName(str):
    """A plain ``str`` to every PEFT lookup and in every saved file, which also prints and reads as PEFT's own
    ``PeftType`` members do: ``.value`` (``hotswap_adapter``'s refusal of a non-LoRA method raised AttributeError
    without it) and ``str()`` as ``"PeftType.RANDMASK"`` (``get_model_status`` keeps what follows the dot)."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"


PEFT_TYPE = _PeftTypeName("RANDMASK")
PREFIX = "randmask_"


MIN_PEFT = (0, 21)
"""The oldest peft this module works with (its tests run against it and against the newest peft installed)."""
MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def peft_version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: ``0.21.2`` -> (0, 21), ``1.0.0rc1`` -> (1, 0)."""
    parts = [int("".join(itertools.takewhile(str.isdigit, p)) or 0) for p in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def check_version(version: str) -> None:
    """MaskingError for a peft older than ``MIN_PEFT``."""
    if peft_version(version) < MIN_PEFT:
        need = ".".join(map(str, MIN_PEFT))
        raise MaskingError(f"randmask.peft needs peft >= {need}; this is peft {version}: pip install -U 'peft>={need}'")


def peft_mappings() -> list[dict]:
    """peft's config, tuner and prefix registries, found by name (a peft that moved them: a MaskingError)."""
    import peft.mapping

    found = [getattr(peft.mapping, name, None) for name in MAPPINGS]
    missing = [name for name, mapping in zip(MAPPINGS, found) if not isinstance(mapping, dict)]
    if missing:
        raise MaskingError(f"randmask.peft cannot register with peft {peft.__version__}: peft.mapping has no "
                           f"{', '.join(missing)} (peft 0.21 has them); install peft 0.21.x (pip install "
                           "'peft>=0.21,<0.22') or a randmask made for this peft")
    return found


def register_public(config_cls: type, model_cls: type) -> bool:
    """Register through ``peft.utils.register_peft_method``; False when this peft refuses the name."""
    register = getattr(peft.utils, "register_peft_method", None)
    if register is None:
        return False
    try:
        register(name=PEFT_TYPE.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    except ValueError:  # peft 0.21: "Unknown PEFT type RANDMASK" (only PeftType's own members are accepted)
        return False
    return True


def register(config_cls: type, model_cls: type) -> None:
    """Make RANDMASK a PEFT method: peft's public registration where it accepts the name, else the three plain-dict
    mappings (what register_peft_method does, minus the enum check)."""
    check_version(peft.__version__)
    config_map, tuner_map, prefix_map = peft_mappings()
    if config_map.get(PEFT_TYPE) is config_cls:
        return  # module re-imported
    if PEFT_TYPE in config_map or PEFT_TYPE in tuner_map:
        raise MaskingError(f"peft already has a method {PEFT_TYPE!r}; randmask cannot register over it.")
    if PREFIX in prefix_map.values():
        raise MaskingError(f"peft already uses the parameter prefix {PREFIX!r}.")
    if not register_public(config_cls, model_cls):
        prefix_map[PEFT_TYPE] = PREFIX
        config_map[PEFT_TYPE] = config_cls
        tuner_map[PEFT_TYPE] = model_cls
    reader = getattr(PeftConfigMixin, "_get_peft_type", None)  # the config's first reader: bounded
    if reader is None:
        warn_caller(f"peft {peft.__version__} has no PeftConfigMixin._get_peft_type: its first read of an "
                    "adapter_config.json is not size-bounded by randmask")
    elif not getattr(reader, "randmask_guard", False):
        PeftConfigMixin._get_peft_type = classmethod(guard_peft_type(reader.__func__))


__all__ = ["MIN_PEFT", "PEFT_TYPE", "PREFIX", "check_version", "peft_mappings", "peft_version", "register",
           "register_public"]
