"""The one bounded reader: regular files only, size checked before a byte is read, strict JSON."""

from __future__ import annotations

import json
import os

import pytest
from tests.hostile import hang_guard, make_sparse, replace_with_dev_zero, replace_with_fifo

from randmask import (
    MaskingError,
    atomic_write_bytes,
    loads_strict,
    open_limited,
    parse_json,
    read_json_limited,
    read_limited,
)


def test_a_regular_file_and_a_symlink_to_one_are_read(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2.5]}')
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")  # as the Hugging Face cache lays files out
    assert read_json_limited(tmp_path / "link.json", 100) == {"x": [1, 2.5]}
    assert read_limited(tmp_path / "a.json", 15) == b'{"x": [1, 2.5]}'


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder"])
def test_non_regular_files_are_refused_unread(tmp_path, kind):
    path = tmp_path / "file"
    if kind == "dev_zero":
        replace_with_dev_zero(path)
    elif kind == "fifo":
        replace_with_fifo(path)
    else:
        path.mkdir()
    with hang_guard(30), pytest.raises(MaskingError, match="not a regular file"):
        read_limited(path, 1 << 20, "test file", fix="pass a real file")


def test_the_size_is_checked_before_reading(tmp_path):
    big = make_sparse(tmp_path / "big.bin")  # 8 GiB to a naive reader, nothing on disk
    with pytest.raises(MaskingError, match="over the 1,048,576-byte limit .test."):
        read_limited(big, 1 << 20, "test")
    with open_limited(tmp_path / "big.bin", 16 << 30, "test") as (f, size):
        assert size == 8 << 30 and f.read(4) == b"\0\0\0\0"


def test_missing_files_and_custom_error_types(tmp_path):
    with pytest.raises(KeyError, match="not found .*; make one"):
        read_limited(tmp_path / "nope", 10, "thing", fix="make one", error=KeyError)


@pytest.mark.parametrize(("text", "match"), [
    (b'{"a": NaN}', "NaN is not JSON"), (b'{"a": Infinity}', "Infinity is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nests JSON deeper"), (b'{"a": "\xff"}', "not UTF-8"),
    (b'{"a": 1', "not valid JSON"), (b'{"a": 1e400}', "out of the float range"),
    (b'{"a": -1e400}', "out of the float range"),
])
def test_strict_json(text, match):
    with pytest.raises(MaskingError, match=match):
        parse_json(text, "where", "test file")


def test_loads_strict_keeps_ordinary_json_and_refuses_what_json_loads_lets_through():
    assert loads_strict('{"lr": 1e-3, "n": 12, "big": 1e308, "s": "NaN"}') == {"lr": 1e-3, "n": 12, "big": 1e308,
                                                                               "s": "NaN"}
    for text in ('[NaN]', '[-Infinity]', '[1e999]'):
        assert json.loads(text)  # Python's own parser accepts each one
        with pytest.raises(ValueError):
            loads_strict(text)


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
