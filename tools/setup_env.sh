#!/usr/bin/env bash
# Create (or refresh) the project virtual environment with every pinned dependency.
#
# Idempotent: a second run only checks versions. The mmcv 2.1.0 wheel (built from the
# PyPI sdist with its C++ ops, ~20 min on 2 cores) is cached in $MMVQ_WHEEL_CACHE
# (default ~/.cache/mmvq/wheels) and reused, so only a fresh machine pays the build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMVQ_VENV:-$ROOT/.venv}"
CACHE_ROOT="${MMVQ_WHEEL_CACHE:-$HOME/.cache/mmvq/wheels}"
PY="${PYTHON:-python3}"

# torch 2.14.1 + torchvision 0.29.1 lie on this machine's disk. mmpretrain
# imports torchvision, and PyPI's torchvision wheels only import beside the
# matching CUDA torch build, so the CPU-only torch 2.13.0 wheel cannot be used
# (see README, "Supported versions").
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
STAMP="$VENV/.mmvq-setup-stamp"
STAMP_KEY="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/setup.py" | sha256sum | cut -c1-16)"

say() { printf '[setup] %s\n' "$*"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] && "$VENV/bin/python" -c "import mmcv.ops, mmdet, mmpretrain, mmvq" 2>/dev/null; then
    say "environment $VENV is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip on this machine lists local index folders that may not exist; drop that noise only
pip_() { "${PIP[@]}" "$@" 2>&1 | sed -u '/WARNING: Location .* is ignored/d'; }

say "installing torch==$TORCH_VERSION, torchvision==$TORCHVISION_VERSION and numpy"
pip_ install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    "$(grep -E '^numpy==' "$ROOT/requirements.txt")"

# the mmcv extension is compiled against one torch: one cache folder per torch
CACHE="$CACHE_ROOT/torch-$TORCH_VERSION"
mkdir -p "$CACHE"
WHEEL="$(ls "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$WHEEL" ]; then
    say "building mmcv==$MMCV_VERSION with ops from the PyPI sdist (about 20 min on 2 cores)"
    # mmcv's setup.py imports pkg_resources and predates setuptools 70; runtime
    # setuptools is re-pinned by requirements.txt below.
    pip_ install -q "setuptools<70" wheel ninja
    TMP="$(mktemp -d)"
    export MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    pip_ download -q --no-deps --no-build-isolation --no-binary :all: -d "$TMP/src" "mmcv==$MMCV_VERSION"
    tar xzf "$TMP/src/mmcv-$MMCV_VERSION.tar.gz" -C "$TMP/src"
    # torch 2.14 headers require C++20 and torch only adds -std=c++20 when no
    # -std flag is given; mmcv 2.1.0's setup.py hard-codes -std=c++17.
    sed -i "s/'-std=c++17'/'-std=c++20'/g" "$TMP/src/mmcv-$MMCV_VERSION/setup.py"
    SRC="$TMP/src/mmcv-$MMCV_VERSION"
    TOTAL="$(ls "$SRC"/mmcv/ops/csrc/pytorch/*.cpp "$SRC"/mmcv/ops/csrc/pytorch/cpu/*.cpp | wc -l)"
    say "the wheel is cached in $CACHE: later setups on this machine skip this build"
    pip_ wheel --no-deps --no-build-isolation --no-cache-dir -w "$TMP" "$SRC" &
    BUILD_PID=$!
    START=$SECONDS
    # pip is silent while the C++ ops compile: one line a minute with the count
    while kill -0 "$BUILD_PID" 2>/dev/null; do
        for _ in $(seq 60); do kill -0 "$BUILD_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$BUILD_PID" 2>/dev/null || break
        DONE="$(find "$SRC/build" -name '*.o' 2>/dev/null | wc -l)"
        say "mmcv ops: $DONE of $TOTAL C++ files compiled, $(( (SECONDS - START) / 60 )) min elapsed (about 20 min in all on 2 cores)"
    done
    wait "$BUILD_PID"
    # move into the cache atomically so an interrupted build leaves no broken wheel
    BUILT="$(ls "$TMP"/mmcv-*.whl)"  # fails (set -e) when the build produced no wheel
    mv "$BUILT" "$CACHE/$(basename "$BUILT").part"
    mv "$CACHE/$(basename "$BUILT").part" "$CACHE/$(basename "$BUILT")"
    rm -rf "$TMP"
    WHEEL="$CACHE/$(basename "$BUILT")"
else
    say "reusing cached mmcv wheel $WHEEL"
fi
say "installing mmcv and the pinned requirements"
pip_ install -q "$WHEEL" -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt"
say "installing mmvq (editable)"
pip_ install -q --no-deps --no-build-isolation -e "$ROOT"

"$VENV/bin/python" -c "import mmvq; mmvq.utils.print_env()"
# onnxruntime's C API header for mmvq's custom operators (Debian's libonnxruntime-dev,
# checked by its sha256; mmvq fetches it at first use otherwise)
say "fetching onnxruntime's C API header (mmvq custom operators)"
"$VENV/bin/python" -c "from mmvq.deploy import ort_ops; print(ort_ops.fetch_header())" \
    || say "warning: the header could not be fetched; export_onnx(custom_ops=True) will try again"
echo "$STAMP_KEY" > "$STAMP"
say "done"
