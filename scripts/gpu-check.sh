#!/usr/bin/env bash
# The GPU checks of issue 12 in one call, on a bare GPU machine with PyTorch and no network:
#   1. installs kvchat and the packages it needs that the machine lacks, from wheels carried in .gpu-wheels/
#      (ignored by git; fill it where there is a network with: scripts/gpu-check.sh --fetch-wheels);
#   2. runs the exactness tests with their tiny models on CUDA (KVCHAT_TEST_DEVICE=cuda);
#   3. builds random-weight Llama-shaped models on the GPU (1B and 8B shapes) and prints prefill and decode
#      tokens/s (eager, and kvchat's compiled decode step with its compile time), resume time and the
#      bandwidth limit (scripts/gpu_speed.py).
# Meant to finish in under 8 minutes. Through the device tool:
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-wheels"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=.gpu-wheels
if [ "${1:-}" = "--fetch-wheels" ]; then
    # The versions this checkout is tested with; pure Python or abi3, so any CPython >= 3.10 takes them.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$wheels" \
        transformers==5.24.0 huggingface_hub==2.4.0 prompt_toolkit==3.0.53 wcwidth==0.9.4 gguf==0.19.0 \
        tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 hf-xet==1.8.0
    exit $?
fi
python=${PYTHON:-python3}
venv=${TMPDIR:-/tmp}/kvchat-gpu
started=$(date +%s)
echo "== set-up"
"$python" -m venv --system-site-packages "$venv" || exit 1
"$venv/bin/python" -m pip install -q --no-index --find-links "$wheels" --no-deps "$wheels"/*.whl || exit 1
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
"$venv/bin/python" -m pip check | grep -i -E "kvchat|transformers|huggingface|tokenizers" || true
"$venv/bin/python" - <<'PY' || exit 1
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA'}")
PY
echo "== exactness tests on CUDA"
KVCHAT_TEST_DEVICE=cuda timeout 240 "$venv/bin/python" -m pytest -q -x -p no:cacheprovider \
    tests/test_engine.py tests/test_store.py tests/test_kv.py tests/test_compiled.py -m "not real_model" 2>&1 | tail -15
echo "== speed (random weights)"
timeout $(( 480 - ($(date +%s) - started) )) "$venv/bin/python" scripts/gpu_speed.py
echo "== done in $(( $(date +%s) - started )) s"
