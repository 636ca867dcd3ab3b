#!/bin/bash
# The GPU session's check: CUDA lossless tests, then bench/device_check.py (profile + engine steps).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi -L | tee $OUT/env.txt
python3 -c "import torch, transformers, pydantic; print(torch.__version__, transformers.__version__, pydantic.__version__, torch.cuda.get_device_name(0))" | tee -a $OUT/env.txt
CAST_TEST_DEVICE=cuda timeout ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" --timeout 120 tests/test_engine.py tests/test_sampling.py 2>&1 | tee $OUT/tests_cuda.log | tail -40
echo "tests rc=$?"
timeout ${CHECK_S:-300} python3 bench/device_check.py --configs .gpu --out $OUT 2>&1 | tr "\r" "\n" | grep -v "^cast profile:" | tee $OUT/device_check.log
echo "check rc=$?"
