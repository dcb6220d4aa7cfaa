#!/usr/bin/env bash
# Build a Python environment in which the OFFICIAL Quiet-STaR code (ezelikman/quiet-star)
# can run, for scripts/official_oracle.py. The official code is not a package: it is a
# patched copy of transformers 4.37's Mistral files, meant to be dropped over the installed
# transformers/models/mistral/ folder. This script does exactly that, in a fresh venv.
#
# Get the official checkout first (it is never copied into this repository):
#   git clone https://github.com/ezelikman/quiet-star /path/to/quiet-star
#
# Usage:
#   bash scripts/official_env.sh VENV_DIR OFFICIAL_CHECKOUT
#   VENV_DIR/bin/python scripts/official_oracle.py --out tests/fixtures/official_step \
#       --run-out tests/fixtures/official_run
#
# Extra pip options (an index URL for CPU-only torch wheels, a proxy) can be passed in
# PIP_ARGS, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: bash scripts/official_env.sh VENV_DIR OFFICIAL_CHECKOUT  (checkout: git clone https://github.com/ezelikman/quiet-star)" >&2
    exit 2
fi
VENV=$1
OFFICIAL=$2

# The two files the official code replaces inside transformers.
for f in modeling_mistral.py configuration_mistral.py; do
    if [ ! -f "$OFFICIAL/$f" ]; then
        echo "error: $OFFICIAL/$f not found; OFFICIAL_CHECKOUT must be a clone of https://github.com/ezelikman/quiet-star" >&2
        exit 2
    fi
done

PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
# The official modeling file imports wandb, seaborn (and so pandas/matplotlib), termcolor,
# tqdm and reportlab at module level, so they are needed even though nothing is logged.
# accelerate: transformers 4.37's Trainer needs it (official_oracle.py --run-out trains with it).
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install ${PIP_ARGS:-} \
    "torch==2.13.0" "transformers==4.37.2" "numpy<2" "accelerate==0.26.1" \
    wandb seaborn termcolor reportlab safetensors

# Where this venv's transformers keeps its Mistral model files.
MISTRAL_DIR=$("$VENV/bin/python" -c 'import os, transformers; print(os.path.join(os.path.dirname(transformers.__file__), "models", "mistral"))')
if [ ! -d "$MISTRAL_DIR" ]; then
    echo "error: $MISTRAL_DIR missing; is transformers 4.37.2 installed in $VENV?" >&2
    exit 2
fi
cp "$OFFICIAL/modeling_mistral.py" "$OFFICIAL/configuration_mistral.py" "$MISTRAL_DIR/"
# Stale bytecode of the stock files must not shadow the copies.
rm -rf "$MISTRAL_DIR/__pycache__"

echo "official Quiet-STaR environment ready: $VENV (transformers/models/mistral replaced from $OFFICIAL)"
