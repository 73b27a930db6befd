#!/usr/bin/env bash
# Build app.py into a gpulet power-plugin component: policy.wasm.
#
#   examples/python-policy/build.sh            # from anywhere
#   OUT=/tmp/out VENV=/tmp/cpy ./build.sh      # elsewhere
#
# Environment:
#   VENV    the virtual environment holding componentize-py (default: .venv next to this
#           script); made, and the pinned componentize-py installed into it, if missing.
#   OUT     the folder policy.wasm is written to (default: this script's folder).
#   PYTHON  the Python that makes the venv (default: python3; 3.9 or newer).
#
# Needs only Python with pip and venv, and PyPI the first time. No Rust, no wasm tools:
# componentize-py brings its own CPython (3.14, built for wasm32-wasi) and linker.
set -euo pipefail

# componentize-py, pinned: 0.25.1, the newest on PyPI when this was written, and the one
# this example was checked with (gpulet's wasmtime 48 runs what it makes; its WASI
# imports are 0.2.9, which the host links: WASI 0.2.x is semver-compatible). Another
# version embeds another CPython and may make other imports: change it deliberately and
# run `gpulet plugin check` on the result.
COMPONENTIZE_PY_VERSION=0.25.1

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
venv="${VENV:-$here/.venv}"
out="${OUT:-$here}"
python="${PYTHON:-python3}"
# The contract, straight from the repository: the WIT of gpulet:policy@0.1.2.
wit="$here/../../wit/v0.1.2"

[ -f "$wit/policy.wit" ] || { echo "build.sh: no WIT at $wit" >&2; exit 1; }

# The tool, in its own venv, at the pinned version.
if [ "$("$venv/bin/componentize-py" --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
    [ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

# A clean staging folder: componentize-py runs the app once at build time and snapshots
# the interpreter (what was imported then is all there is at run time; the component has
# no files). Giving it only app.py keeps the tests, the venv and old builds out of its
# search path.
stage="$(mktemp -d)"
trap 'rm -rf -- "$stage"' EXIT
cp -- "$here/app.py" "$stage/"
# An empty site-packages, named through VIRTUAL_ENV: without it componentize-py adds the
# site-packages of whatever `python3` is first on PATH (and of an activated venv, which
# would be the tool's own) to the app's search path, walking them all at build time and
# baking their listings into the snapshot. The policy needs only the standard library.
mkdir -p "$stage/env/lib/site-packages"

mkdir -p -- "$out"
# -d: the WIT folder; -w power: the world (the file also has base, scheduler,
# job-scheduler and reporter); componentize app: the module defining `WitWorld`;
# -p: the app's folder. Not --stub-wasi: it would turn every WASI call (a stray print,
# os.urandom) into a trap, and the host links WASI anyway.
# componentize-py writes bindings (the `wit_world` package) into the snapshot itself:
# there is nothing to generate first. For an editor, `componentize-py -d "$wit" -w power
# bindings DIR` writes the same Python files to DIR.
VIRTUAL_ENV="$stage/env" "$venv/bin/componentize-py" \
    -d "$wit" -w power \
    componentize app \
    -p "$stage" \
    -o "$out/policy.wasm"

echo "wrote $out/policy.wasm ($(wc -c < "$out/policy.wasm") bytes); check it with:"
echo "  gpulet plugin check $out/policy.wasm"
