#!/usr/bin/env bash
# llama.cpp for qatune's export stage and `generate.mode: gguf`, installed into one Python environment:
#   docker/llama-cpp.sh PYTHON VERSION
# llama-cpp-python's source distribution on PyPI vendors llama.cpp whole (its converter
# convert_hf_to_gguf.py, conversion/ and gguf-py/ included). PyPI has no wheel: it builds here with cmake and
# g++ (about 4.5 min on 2 cores; pip caches the wheel, so a second environment takes seconds), with only the
# library (no examples, tools, server or OpenMP). The converter is copied to <prefix>/share/qatune/llama.cpp,
# where qatune.export looks for it.
set -euo pipefail
python=$1
version=$2
prefix=$("$python" -c 'import sys; print(sys.prefix)')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
echo "llama.cpp (llama-cpp-python $version) for the export stage: built once, a few minutes"
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_OPENMP=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$python" -m pip install --quiet --no-deps "$work/llama_cpp_python-$version"
dest="$prefix/share/qatune/llama.cpp"
rm -rf "$dest" && mkdir -p "$dest"
(cd "$work/llama_cpp_python-$version/vendor/llama.cpp" && cp -r convert_hf_to_gguf.py conversion gguf-py LICENSE "$dest/")
"$python" -c 'import llama_cpp; print("llama.cpp ready: llama-cpp-python", llama_cpp.__version__)'
