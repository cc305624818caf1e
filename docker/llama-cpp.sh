#!/usr/bin/env bash
# llama.cpp for qatune's export stage and `generate.mode: gguf`, installed into one Python environment:
#   docker/llama-cpp.sh PYTHON VERSION [CACHE]
# llama-cpp-python's source distribution on PyPI vendors llama.cpp whole (its converter
# convert_hf_to_gguf.py, conversion/ and gguf-py/ included). PyPI has no wheel: it builds here with cmake,
# g++ and ninja or make (about 4.5 min on 2 cores), with only the library (no examples, tools, server or
# OpenMP). The converter is copied to <prefix>/share/qatune/llama.cpp, where qatune.export looks for it.
#
# CACHE (default $LLAMA_CPP_CACHE; none = no cache) holds one folder per build, named by what makes a build
# differ: llama-cpp-python's version, the Python (cache tag), the platform and C library, and a hash of the
# cmake flags and this CPU's instruction-set flags (llama.cpp compiles for the CPU it builds on). A folder
# holds the wheel and the converter; `make setup`, the CUDA-stack venv and the image builds share it, so
# llama.cpp compiles once per machine. A read-only CACHE (the images' bind mount) is read, never written.
set -euo pipefail
python=$1
version=$2
cache=${3:-${LLAMA_CPP_CACHE:-}}
cmake_args="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_OPENMP=OFF"
prefix=$("$python" -c 'import sys; print(sys.prefix)')
key=$("$python" - "$version" "$cmake_args" <<'PY'
import hashlib, platform, sys, sysconfig
version, cmake_args = sys.argv[1:]
try:
    cpu = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
except OSError:
    cpu = ""
libc = "".join(platform.libc_ver()) or "libc"
digest = hashlib.sha256(f"{cmake_args}\n{' '.join(sorted(cpu.split()))}".encode()).hexdigest()[:12]
print(f"{version}-{sys.implementation.cache_tag}-{sysconfig.get_platform()}-{libc}-{digest}")
PY
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
entry=""
if [ -n "$cache" ] && ls "$cache/$key"/llama_cpp_python-*.whl >/dev/null 2>&1 && [ -f "$cache/$key/converter/convert_hf_to_gguf.py" ]; then
  entry="$cache/$key"
  echo "llama.cpp (llama-cpp-python $version): cached build $key"
else
  # --no-binary for llama-cpp-python alone: its build tools (scikit-build-core, ninja, ...) come as wheels.
  "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$work" "llama-cpp-python==$version"
  tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
  echo "llama.cpp (llama-cpp-python $version) for the export stage: built once per machine, a few minutes"
  mkdir -p "$work/out/converter"
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$python" -m pip wheel --quiet --no-deps -w "$work/out" "$work/llama_cpp_python-$version"
  (cd "$work/llama_cpp_python-$version/vendor/llama.cpp" \
    && cp -r convert_hf_to_gguf.py conversion gguf-py LICENSE "$work/out/converter/")
  entry="$work/out"
  if [ -n "$cache" ] && mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] && [ ! -e "$cache/$key" ]; then
    cp -r "$work/out" "$cache/$key.tmp.$$" && mv -T "$cache/$key.tmp.$$" "$cache/$key" \
      && echo "cached as $cache/$key"
  fi
fi
"$python" -m pip install --quiet --no-deps --force-reinstall "$entry"/llama_cpp_python-*.whl
dest="$prefix/share/qatune/llama.cpp"
rm -rf "$dest" && mkdir -p "$dest"
cp -r "$entry/converter/." "$dest/"
"$python" -c 'import llama_cpp; print("llama.cpp ready: llama-cpp-python", llama_cpp.__version__)'
