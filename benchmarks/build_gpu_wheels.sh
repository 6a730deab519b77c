#!/usr/bin/env bash
# Build, on a machine with network, the wheels benchmarks/gpu_check.sh needs on a bare GPU machine:
# one whose image has torch + CUDA, transformers, safetensors, sentencepiece and tokenizers but no
# DeepSpeed and no network. Output: wheels/ (git-ignored; copy it next to the checkout).
#   bash benchmarks/build_gpu_wheels.sh            # from the repository root, in megalm's venv
# DeepSpeed is built with DS_BUILD_OPS=0 (pure Python: nothing is compiled, and megalm's path needs no
# op, so nothing is JIT-built there either). Its compiled dependencies are fetched as binary wheels for
# CPython 3.10-3.13 on x86_64 and aarch64, since the GPU image's Python is not known here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${WHEELS:-wheels}
PY=${PYTHON:-python}
mkdir -p "$OUT"
pin() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DS=$(pin deepspeed)

# DeepSpeed itself, the version megalm is tested with here (pyproject pins <0.20)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DS"

# its pure-Python dependencies (and theirs), at the versions this venv runs
pure=(hjson py-cpuinfo pydantic annotated-types typing-inspection typing_extensions einops packaging tqdm)
specs=()
for p in "${pure[@]}"; do specs+=("$p==$(pin "$p")"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$OUT" "${specs[@]}"

# compiled dependencies: one wheel per CPython version and platform (psutil is abi3: one serves all)
compiled=("pydantic_core==$(pin pydantic_core)" "msgpack==$(pin msgpack)" "psutil==$(pin psutil)"
          "ninja==$(pin ninja)" "xxhash==$(pin xxhash)")
for arch in x86_64 aarch64; do
  for v in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$OUT" --python-version "$v" \
      --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" --platform "manylinux_2_28_$arch" \
      "${compiled[@]}"
  done
done
find "$OUT" -maxdepth 1 -name "*.whl" -printf "  %f\n" | sort
du -sh "$OUT"
