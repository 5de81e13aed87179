#!/usr/bin/env bash
# Build (once) a second venv with the stack OpenVLA's remote code requires, and run the VLA tests in it.
#
#   bash .ci/compat_venv.sh [VENV_DIR]        (default: /tmp/vprune-compat-venv)
#
# OpenVLA users run transformers 4.40.1 with timm 0.9.x (the remote code refuses other timm versions,
# and on transformers >= 4.50 its generate() skips the vision tower), so the OpenVLA integration, the
# "dual" strategy and the testbed policy are tested there as well as in the main venv.
# VPRUNE_COMPAT_TESTS overrides the test files; extra arguments after VENV_DIR go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/vprune-compat-venv}"
shift || true
PYTHON="${PYTHON:-python3}"
SPEC="torch==2.14.1 torchvision==0.29.1 transformers==4.40.1 tokenizers==0.19.1 timm==0.9.16 einops pillow safetensors numpy pytest"
STAMP="$VENV/.vprune-compat-spec"

if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$SPEC" ]]; then
    echo "compat venv: building $VENV ($SPEC)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $SPEC
    echo "$SPEC" > "$STAMP"
fi
# Editable install of this checkout (cheap; re-done every run so a moved checkout is picked up).
"$VENV/bin/python" -m pip install -q -e "$ROOT" --no-deps

"$VENV/bin/python" -W ignore::FutureWarning - <<'PY'
import timm, torch, transformers
print(f"compat venv: torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}")
assert transformers.__version__ == "4.40.1", transformers.__version__
assert timm.__version__ == "0.9.16", timm.__version__
import vprune  # the core must import on this stack
PY

TESTS="${VPRUNE_COMPAT_TESTS:-tests/test_temporal.py tests/test_openvla.py tests/test_testbed_policy.py}"
present=()
for t in $TESTS; do
    if [[ -f "$ROOT/$t" ]]; then present+=("$t"); else echo "compat venv: $t not found, skipped"; fi
done
if [[ ${#present[@]} -eq 0 ]]; then
    echo "compat venv: no VLA test files found" >&2
    exit 1
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "${present[@]}" -q -p no:cacheprovider "$@"
