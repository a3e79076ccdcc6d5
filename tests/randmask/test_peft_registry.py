"""randmask's registration as a PEFT method (``randmask.peft_registry``), against the installed peft."""

from __future__ import annotations

import pytest

from randmask import MaskingError

peft = pytest.importorskip("peft")

from randmask.peft import PEFT_TYPE, RandMaskConfig  # noqa: E402


def test_registration_route_follows_the_installed_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    if PEFT_TYPE not in list(PeftType):  # peft 0.21: why register_peft_method cannot be used ...
        with pytest.raises(ValueError, match="Unknown PEFT type"):
            register_peft_method(name="randmask_probe", config_cls=RandMaskConfig, model_cls=object)
        assert issubclass(PeftType, str)  # ... and why a plain str key works in its plain-dict mappings
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] is RandMaskConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE].__name__ == "RandMaskModel"
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] == "randmask_"
    assert isinstance(RandMaskConfig(density=0.1), peft.PeftConfig)


def test_an_old_peft_is_refused_naming_the_version_needed():
    from randmask.peft_registry import check_version, peft_version

    assert peft_version("0.21.2") == (0, 21) and peft_version("1.0.0rc1") == (1, 0) and peft_version("2") == (2, 0)
    with pytest.raises(MaskingError, match=r"needs peft >= 0\.21; this is peft 0\.13\.0"):
        check_version("0.13.0")
    check_version("0.21.0")
    check_version("0.30.1")  # no upper bound


def test_a_peft_without_the_registries_is_a_clear_error(monkeypatch):
    import peft.mapping

    from randmask.peft_registry import peft_mappings

    assert len(peft_mappings()) == 3
    monkeypatch.delattr(peft.mapping, "PEFT_TYPE_TO_TUNER_MAPPING")
    with pytest.raises(MaskingError, match="peft.mapping has no PEFT_TYPE_TO_TUNER_MAPPING .peft 0.21 has them"):
        peft_mappings()


def test_the_public_registration_is_used_where_peft_accepts_the_name(monkeypatch):
    import peft.utils

    from randmask import peft as rpeft
    from randmask.peft_registry import register_public

    calls = []
    monkeypatch.setattr(peft.utils, "register_peft_method", lambda **kw: calls.append(kw))
    assert register_public(RandMaskConfig, rpeft.RandMaskModel) is True
    assert calls == [{"name": "randmask", "config_cls": RandMaskConfig, "model_cls": rpeft.RandMaskModel,
                      "prefix": "randmask_"}]

    def refuses(**kw):
        raise ValueError("Unknown PEFT type RANDMASK, please add an entry to peft.utils.peft_types.PeftType.")

    monkeypatch.setattr(peft.utils, "register_peft_method", refuses)
    assert register_public(RandMaskConfig, rpeft.RandMaskModel) is False  # peft 0.21: the plain-dict route
