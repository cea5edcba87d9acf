#!/usr/bin/env bash
# Run benchmarks/gpu/gpu_check.py on a GPU machine whose image lacks this project's transformers version.
#
#   bash benchmarks/gpu/gpu_check.sh download   # here, with network: the wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu/gpu_check.sh            # on the GPU machine, offline, from the repo with .whl/ copied along
#
# The GPU image has torch 2.11 and transformers 5.17; this project needs transformers >= 5.24 (the `cache=` kwarg,
# transformers.utils.output_capturing), which needs newer huggingface_hub, tokenizers, safetensors and regex than
# such an image may have. They are installed with --no-deps into /tmp/site, first on PYTHONPATH with the repo root,
# so `modeling_diff` and `benchmarks` import from the checkout (no pip install -e); `evaluation/` is linked into
# /tmp/site under its installed name, `modeling_diff_eval` (the check reads its plain-torch reference).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=(transformers==5.24.0 huggingface_hub==1.33.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.5.9
        hf-xet==1.8.0 click==8.4.2 typer==0.29.2)
if [[ "${1:-}" == "download" ]]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls .whl
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
ln -sfn "$PWD/evaluation" /tmp/site/modeling_diff_eval
export PYTHONPATH=/tmp/site:$PWD
# the whole check is sized for ~5 minutes on one H100; the timeout leaves room for a rerun in a 15-minute lease
timeout "${GPU_CHECK_TIMEOUT:-480}" python3 -m benchmarks.gpu.gpu_check "$@"
