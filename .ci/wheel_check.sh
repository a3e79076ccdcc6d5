#!/usr/bin/env bash
# Build the wheel, install it in a fresh venv away from the source tree, and check that it works there:
# `import randmask` (torch + safetensors only), the native kernel builds from the packaged C source, and the
# `randmask` command answers --help. Run by .ci/run (make wheel-check).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$root/.venv/bin/pip" wheel -q --no-deps -w "$work/dist" "$root" 2>&1 | grep -v "^WARNING: Location" || true
wheel="$(ls "$work"/dist/randmask-*.whl)"
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true  # the CPU build first
"$work/venv/bin/pip" install -q "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
cd "$work"  # away from the source tree: only the installed package can be imported
RANDMASK_CACHE="$work/cache" "$work/venv/bin/python" - <<'PY'
import sys

import randmask
import randmask.native as native

assert "site-packages" in randmask.__file__, randmask.__file__
assert "transformers" not in sys.modules and "peft" not in sys.modules, "the library imported the lab's deps"
assert native.available(), "the native kernel did not build from the packaged source"
print(f"wheel ok: randmask {randmask.__version__} from {randmask.__file__}; native kernel built")
PY
"$work/venv/bin/pip" install -q "$wheel[lab]" 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/randmask" --help | head -3
echo "wheel check passed"
