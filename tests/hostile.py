"""Helpers for the hostile-file tests: copies to damage, non-regular files, a hang guard, a memory-limited
subprocess, and the mutations and settings of the fuzz tests.

A reader that regresses must fail its test, not take the suite down: a FIFO would block an unguarded
open forever (``hang_guard`` turns that into a TimeoutError), and ``/dev/zero`` would be read until
memory runs out (``run_limited`` runs such a case in a subprocess whose address space is capped).
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADROOM = 2 << 30  # bytes of address space a limited process may grow by after its imports



def fresh_copy(source: Path, dest: Path, names: Iterable[str]) -> Path:
    """Copy the files ``names`` of ``source`` into ``dest``: a test's own copy of a saved adapter to damage
    (the adapter is trained and saved once per module); returns ``dest``."""
    for name in names:
        shutil.copyfile(source / name, dest / name)
    return dest

def replace_with_fifo(path: Path) -> Path:
    """Replace ``path`` by a named pipe (no writer: a blocking open would wait forever)."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def replace_with_dev_zero(path: Path) -> Path:
    """Replace ``path`` by a symlink to /dev/zero (endless bytes)."""
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")
    return path


def make_sparse(path: Path, size: int = 8 << 30) -> Path:
    """Grow ``path`` to ``size`` bytes without using the disk (a huge file to a naive reader)."""
    with open(path, "ab") as f:
        f.truncate(size)
    return path


@contextmanager
def hang_guard(seconds: int = 60) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds`` (e.g. blocked on a FIFO)."""
    def _timeout(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"still blocked after {seconds} s: a non-regular file was opened or read")

    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def limit_memory(headroom: int = HEADROOM) -> None:
    """Cap this process's address space at its current size plus ``headroom`` (call after the imports)."""
    size = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))


def run_limited(body: str, imports: str = "", headroom: int = HEADROOM, timeout: int = 300
                ) -> subprocess.CompletedProcess:
    """Run ``imports`` then ``body`` in a fresh interpreter whose memory is capped before ``body`` runs."""
    code = "\n".join([
        "import sys",
        f"sys.path[:0] = [{str(REPO_ROOT / 'src')!r}, {str(REPO_ROOT)!r}]",
        "import tests.conftest  # thread count and quiet transformers, as under pytest",
        textwrap.dedent(imports),
        "from tests.hostile import limit_memory",
        f"limit_memory({headroom})",
        textwrap.dedent(body),
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout)


def make_read_only(path: Path) -> Callable[[], None]:
    """Make the tree at ``path`` read-only for this process, also as root (``chattr +i``); returns the undo.
    Skips the calling test where neither works (root on a file system without immutable files)."""
    import pytest

    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        return lambda: [p.chmod(m) for p, m in modes.items()] and None
    if subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    return lambda: subprocess.run(["chattr", "-R", "-i", str(path)], check=True) and None


# -- hypothesis mutations shared by the fuzz tests of each reader ------------------------------------------------



def fuzz_settings(max_examples: int):
    """The fuzz tests' hypothesis settings: reproducible (derandomized, no example database), no deadline, and no
    health check (a slow reference build or a filtered draw is expected)."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def perturb_trainable(model, std: float = 0.05):
    """Draw every trainable parameter of ``model`` from N(0, std²) in place (a reference adapter whose files hold
    values that change the output); returns the model."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return model


def load_or_refuse(files: dict[str, bytes], load: Callable[[str], object]) -> object | None:
    """Write ``files`` (name -> bytes) into a fresh folder and ``load`` it: the result, or None after a
    MaskingError (any other exception fails the property)."""
    from randmask import MaskingError

    with tempfile.TemporaryDirectory() as d:
        for name, blob in files.items():
            (Path(d) / name).write_bytes(blob)
        try:
            return load(d)
        except MaskingError:
            return None

def json_paths(obj: object, path: tuple = ()) -> Iterator[tuple]:
    """Every node of a JSON value, as the path of keys / indices that reaches it."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, (*path, i))


def odd_values():
    """Values of every JSON type a field should not hold: None, bools, short strings, huge ints, NaN, lists."""
    from hypothesis import strategies as st

    return st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-10**20, 10**20),
                     st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-3, 3), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def mutate_json(obj: object, data, skip: Callable[[tuple], bool] = lambda path: False) -> object:
    """One structural edit at a random node (not one ``skip`` names): drop, duplicate, retype, huge, negative,
    NaN, or a string where a number was. Edits ``obj`` in place and returns it (or a replacement root)."""
    from hypothesis import strategies as st

    paths = [p for p in json_paths(obj) if not skip(p)]
    path = data.draw(st.sampled_from(paths))
    op = data.draw(st.sampled_from(["drop", "duplicate", "retype", "huge", "negative", "nan", "string"]))
    if not path:
        return data.draw(odd_values())
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    if op == "drop":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(value))
    elif op == "duplicate":  # a sibling key takes this value
        parent[data.draw(st.sampled_from(list(parent)))] = copy.deepcopy(value)
    elif op == "retype":
        parent[key] = data.draw(odd_values())
    elif op == "huge":
        parent[key] = data.draw(st.sampled_from([10**12, 2**63, 10**30, 1e308, 1e9, -1e308]))
    elif op == "negative":
        parent[key] = -value if isinstance(value, (int, float)) and value else -1
    elif op == "nan":
        parent[key] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    else:
        parent[key] = str(value)
    return obj


def damage_bytes(blob: bytes, data) -> bytes:
    """Truncate, or flip one byte (raw disk damage)."""
    from hypothesis import strategies as st

    if not blob:
        return blob
    pos = data.draw(st.integers(0, len(blob) - 1))
    if data.draw(st.booleans()):
        return blob[:pos]
    return blob[:pos] + bytes([blob[pos] ^ data.draw(st.integers(1, 255))]) + blob[pos + 1:]



def mutated_config_text(config: dict, data, reseal: Callable[[dict], None],
                        skip: Callable[[tuple], bool] = lambda path: False) -> bytes:
    """A copy of ``config`` after one ``mutate_json`` edit, resealed half the time (``reseal`` recomputes the
    checksums, as a careful hand edit does; only when the edit left a dict), as JSON text whose bytes are
    damaged half the time."""
    from hypothesis import strategies as st

    config = mutate_json(copy.deepcopy(config), data, skip=skip)
    if isinstance(config, dict) and data.draw(st.booleans()):
        reseal(config)
    text = to_json_text(config)
    if data.draw(st.booleans()):
        text = damage_bytes(text, data)
    return text


def damaged_weights(config: dict, weights: bytes, data, reseal: Callable[[dict, bytes], None]
                    ) -> tuple[bytes, bytes, bool]:
    """``weights`` with ``damage_bytes``, and a copy of ``config`` as JSON text, resealed over the damaged bytes
    half the time (then the checksums match, and parsing and the tensor checks must hold):
    (config text, weights, resealed)."""
    from hypothesis import strategies as st

    weights = damage_bytes(weights, data)
    config = copy.deepcopy(config)
    resealed = data.draw(st.booleans())
    if resealed:
        reseal(config, weights)
    return to_json_text(config), weights, resealed

def to_json_text(obj: object) -> bytes:
    """JSON as a careless writer would produce it: NaN and Infinity written as such (json.dumps' default)."""
    return json.dumps(obj).encode()
