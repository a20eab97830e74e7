#!/usr/bin/env bash
# Makes .venv and installs the verified stack in order, then shardrec itself (editable, with tests).
# Idempotent: a second run checks a stamp and the imports and returns in a few seconds.
#
#   torch 2.13.0 -> fbgemm-gpu 1.8.0 (CUDA host) or fbgemm-gpu-cpu 1.8.0 (CPU host)
#   -> torchrec 1.8.0 with --no-deps (its metadata asks for the CUDA fbgemm-gpu, which would
#      clash with the CPU build) plus its own needs -> torchx (with kubernetes, which its kubernetes
#      scheduler needs even for --dryrun), pyarrow, pyyaml, pytest, tensorboard (run scalars),
#      ray[tune] and optuna (shardrec tune), transformers (HLLM's language models) -> shardrec
#
# Environment: PYTHON (interpreter, default python3), SHARDREC_VENV (default .venv),
# SHARDREC_DEVICE=cpu|cuda to override the detection, PIP_INDEX_URL etc. as usual for pip.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SHARDREC_VENV:-.venv}

detect_device() {
  if [ -n "${SHARDREC_DEVICE:-}" ]; then echo "$SHARDREC_DEVICE"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; else echo cpu; fi
}

DEVICE=$(detect_device)
case "$DEVICE" in
  cuda) FBGEMM="fbgemm-gpu==1.8.0" ;;
  cpu) FBGEMM="fbgemm-gpu-cpu==1.8.0" ;;
  *) echo "setup.sh: SHARDREC_DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac

STACK=(
  "torch==2.13.0"
  "$FBGEMM"
  "torchrec==1.8.0"
  "tensordict" "torchmetrics==1.0.3" "tqdm" "pyre-extensions" "iopath"
  "torchx==0.7.0" "kubernetes" "pyarrow" "pyyaml" "matplotlib" "pytest" "pytest-timeout"
  "tensorboard==2.21.0" "ray[tune]==2.60.0" "optuna==5.1.0" "transformers==5.25.0"
)
STAMP="$VENV/.shardrec-stack"
WANT="$DEVICE $(cat "$0" pyproject.toml | cksum)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup.sh: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c "import torchrec, fbgemm_gpu, shardrec" 2>/dev/null; then
  echo "setup.sh: $VENV is up to date ($DEVICE stack)"
  exit 0
fi

echo "setup.sh: installing the $DEVICE stack into $VENV"
rm -f "$STAMP"
pipi "${STACK[0]}"
# fbgemm must match torch; the other build of it must not be present.
if [ "$DEVICE" = cpu ]; then "$PY" -m pip uninstall -y -q fbgemm-gpu 2>/dev/null || true
else "$PY" -m pip uninstall -y -q fbgemm-gpu-cpu 2>/dev/null || true; fi
pipi "${STACK[1]}"
pipi --no-deps "${STACK[2]}"
pipi "${STACK[@]:3}"
pipi --no-deps -e .
"$PY" -c "import torch, torchrec, fbgemm_gpu, shardrec; print('setup.sh: torch', torch.__version__, '| torchrec ok | shardrec', shardrec.__version__)"
echo "$WANT" > "$STAMP"
