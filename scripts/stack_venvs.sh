#!/usr/bin/env bash
# Build the "software stack" virtual environments used by scripts/stack_check.py.
#
#   bash scripts/stack_venvs.sh            # both stacks
#   bash scripts/stack_venvs.sh 4.40.2     # one stack
#
# Each stack is .stacks/venv-transformers-<ver>/ (git-ignored), made with
# `python3 -m venv --system-site-packages`, so torch / bitsandbytes / numpy come from
# the system Python and only the Hugging Face packages of that era are installed inside.
#
#   4.40.2 (April 2024): transformers==4.40.2 tokenizers==0.19.1 huggingface_hub<0.24
#                        (4.40.2 needs huggingface-hub>=0.19.3,<1.0 and tokenizers>=0.19,<0.20)
#                        peft==0.10.0 (March 2024; needs transformers, accelerate>=0.21)
#                        accelerate==0.29.3 (same month)
#   5.24.0 (installed):  no packages of its own; the venv only links the system ones, so
#                        `.stacks/venv-transformers-5.24.0/bin/python` is the system stack.
#
# Nothing here downloads a model or a config: the tracing builds models from config.json.
# Idempotent: a venv whose transformers already has the wanted version is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACKS="$ROOT/.stacks"
PY="${PYTHON:-python3}"

declare -A PINS=(
  ["4.40.2"]="transformers==4.40.2 tokenizers==0.19.1 huggingface_hub>=0.19.3,<0.24 peft==0.10.0 accelerate==0.29.3"
  ["5.24.0"]=""
)

versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then versions=("4.40.2" "5.24.0"); fi

mkdir -p "$STACKS"
status=0
for ver in "${versions[@]}"; do
  if [ -z "${PINS[$ver]+set}" ]; then
    echo "stack_venvs: ERROR: no pins known for transformers $ver (known: ${!PINS[*]})" >&2
    status=1; continue
  fi
  venv="$STACKS/venv-transformers-$ver"
  vpy="$venv/bin/python"
  have="$("$vpy" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)"
  if [ "$have" = "$ver" ]; then
    echo "stack_venvs: $venv already has transformers $have: nothing to do"
    continue
  fi
  if [ ! -x "$vpy" ]; then
    echo "stack_venvs: creating $venv (system site packages visible)"
    "$PY" -m venv --system-site-packages "$venv"
  fi
  pins="${PINS[$ver]}"
  if [ -n "$pins" ]; then
    echo "stack_venvs: installing into $venv: $pins"
    # shellcheck disable=SC2086
    if ! "$vpy" -m pip install --quiet --disable-pip-version-check $pins; then
      echo "stack_venvs: ERROR: pip install failed for transformers $ver ($pins)" >&2
      status=1; continue
    fi
  fi
  have="$("$vpy" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)"
  if [ "$have" != "$ver" ]; then
    echo "stack_venvs: ERROR: $venv has transformers '${have:-none}', wanted $ver" \
         "(for a system-stack version the system Python must have it installed)" >&2
    status=1; continue
  fi
  "$vpy" -c 'import importlib.metadata as m
print("stack_venvs: ready:", ", ".join(f"{p} {m.version(p)}" for p in
      ("transformers", "peft", "tokenizers", "huggingface_hub", "accelerate", "torch", "bitsandbytes")))'
done
exit $status
