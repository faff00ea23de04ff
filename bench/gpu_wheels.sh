#!/usr/bin/env bash
# Download the wheels bench/gpu_check.py needs on a bare GPU machine (torch and transformers installed, no network)
# into .whl/ at the repository root. Run it here, on a machine with PyPI; carry .whl/ with the code; there, run
#
#     pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python bench/gpu_check.py
#
# The scripts import datasets, tyro and (ppo.py) vaderSentiment at the top. What those need besides is assumed to be
# on the GPU machine already (its image has numpy, pandas, xxhash, fsspec, filelock, pyyaml, tqdm, requests,
# huggingface-hub, rich, typing-extensions, packaging); datasets 5.2 wants pyarrow >= 24, so pyarrow comes too
# (--no-pyarrow leaves it out where the machine's own is recent enough). PYTHON_VERSION (default 3.12) picks the
# GPU machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_VERSION:-3.12}
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.0
        vaderSentiment==3.3.2)
[[ "${1:-}" == "--no-pyarrow" ]] || WHEELS+=(pyarrow==26.0.1)
rm -rf .whl && mkdir .whl
pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls -l .whl
du -ch .whl/* | tail -1
