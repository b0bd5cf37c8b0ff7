#!/usr/bin/env bash
# Idempotent install of everything guard_fast needs on a fresh Debian machine:
#   1. Debian packages FFCV compiles against (OpenCV core/imgproc, libjpeg-turbo) and the official Fashion-MNIST IDX
#      files (dataset-fashion-mnist, 30 MB: guard-fast data prepare-fashion-mnist reads them; docs/datasets.md),
#   2. a dependency environment cached under a hash of requirements.txt + ENV_VERSION, shared by every checkout and
#      built under a lock (flock), so two setups never build into the same folder,
#   3. the pinned Python stack, FFCV built from source, torchattacks without its deps,
#   4. this checkout's own `.venv`: a small layer over the shared environment that imports *this* checkout's code
#      (scripts/envlib.sh), so checkouts sharing the cache never run each other's code.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
py=${PYTHON:-python3}
cache=${GUARD_FAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/guard_fast}
# Bump ENV_VERSION when a change to the install steps below must rebuild existing environments.
ENV_VERSION=2
spec=$( (cat requirements.txt; echo "$ENV_VERSION") | sha256sum | cut -c1-12)
venv=$cache/venv-$spec
mkdir -p "$cache"

. scripts/envlib.sh

say() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] FAILED: %s\n' "$*" >&2; exit 1; }

# 1. Debian packages. FFCV's C++ uses only cv::Mat and cv::resize, so OpenCV core + imgproc suffice (49 MB instead
#    of the 690 MB libopencv-dev); Debian ships no opencv4.pc with those two, so we write one for the build.
#    dataset-fashion-mnist puts the official IDX files in /usr/share/datasets/fashion-mnist.
need_apt=()
for p in libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing Debian packages: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
    fail "need root to apt-get install ${need_apt[*]} (FFCV compiles against them; Fashion-MNIST's files); install them, then rerun 'make setup'"
  fi
  $sudo apt-get update -qq || fail "apt-get update failed (no network to the Debian mirror?)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" \
    || fail "apt-get install ${need_apt[*]} failed"
fi
# FFCV includes <opencv2/opencv.hpp>, which pulls in every module Debian built; a shim header that includes only
# core + imgproc sits first on the include path.
pcdir=$cache/pkgconfig
mkdir -p "$pcdir" "$cache/opencv-shim/opencv2"
if ! pkg-config --exists opencv4 2>/dev/null || [ -f "$pcdir/opencv4.pc" ]; then
  printf '#pragma once\n#include "opencv2/core.hpp"\n#include "opencv2/imgproc.hpp"\n' \
    > "$cache/opencv-shim/opencv2/opencv.hpp"
  cat > "$pcdir/opencv4.pc" <<PC
Name: OpenCV
Description: OpenCV core + imgproc (all FFCV links)
Version: 4
Libs: -lopencv_core -lopencv_imgproc
Cflags: -I$cache/opencv-shim -I/usr/include/opencv4
PC
fi
export PKG_CONFIG_PATH=$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}

# 2-3. The environment, built once per dependency spec; a marker file says it finished. The lock serializes setups
#      of every checkout sharing the cache (the second one waits, then finds the environment complete).
exec 9>"$cache/setup.lock"
flock 9
register_user "$cache" "$repo"
if [ ! -f "$venv/.complete" ]; then
  say "building Python environment $venv (once per dependency spec; several minutes)"
  command -v gcc >/dev/null || fail "no C compiler: apt-get install build-essential (FFCV builds from source)"
  rm -rf "$venv"
  "$py" -m venv "$venv" || fail "'$py -m venv' failed: install python3-venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip setuptools wheel || fail "pip upgrade failed"
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1 || fail "torch install failed"
  "${pip[@]}" -r requirements.txt || fail "pip install -r requirements.txt failed"
  # torchattacks pins requests~=2.25.1 (it never imports requests) which breaks resolution: install it alone.
  "${pip[@]}" --no-deps torchattacks==3.5.1 || fail "torchattacks install failed"
  touch "$venv/.complete"
fi
# 4. This checkout's layer (re-pointed when the dependency spec or the checkout's location changes).
layer_venv "$venv" "$repo" || fail "could not create $repo/.venv over $venv"
# environments of older dependency specs are 6 GB each: drop those no checkout and no running process uses
remove_unused "$cache" "$venv"
flock -u 9
(cd / && "$repo/.venv/bin/python" -c "import guard_fast, os, sys; sys.exit(os.path.dirname(os.path.dirname(guard_fast.__file__)) != '$repo')") \
  || fail "$repo/.venv does not import this checkout's guard_fast"
say "ready: $(.venv/bin/python -c 'import torch, ffcv, deepspeed, torchattacks, triton; print("torch", torch.__version__, "ffcv", ffcv.__version__ if hasattr(ffcv, "__version__") else "1.0.2", "deepspeed", deepspeed.__version__, "triton", triton.__version__)' 2>/dev/null)"
