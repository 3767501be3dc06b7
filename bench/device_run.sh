#!/usr/bin/env bash
# One-shot GPU benchmark for the day a GPU is lent (issue 15): ours vs the official Sonic code on the
# same random full-size weights, 512x512, 25-frame windows, a 10 s clip, fp16 and bf16, guidance rows
# 3 / 1, fp8 weights, torch.compile on / off, runs capped at 7.5 GB; a few steps timed and
# extrapolated to 25; one printed table, also written as Markdown + JSON for bench/RESULTS.md.
# Built to finish in under 8 minutes on one H100/H200-class GPU (the official side ~1 min, ours
# stops starting modes after --budget-s, 330 s by default).
#
#   bash bench/device_run.sh --prepare   # here, with network: official code + wheels -> bench/.device/
#   bash bench/device_run.sh --dry-run   # the same code at tiny sizes on the CPU (tests/test_device_run.py)
#   bash bench/device_run.sh             # on the GPU machine (no network needed there)
#   bash bench/device_run.sh --dynamic-vram [--dry-run]   # issue 31's check, in its own device call
#
# --dynamic-vram runs bench/_dynamic_vram_check.py alone: ComfyUI 0.33 with dynamic VRAM, another
# model resident, then Sonic's UNet through the pack's patcher (and through the old plain
# ModelPatcher): is the other model still resident afterwards? It needs ComfyUI 0.33's sources and
# requirements. --prepare puts them in bench/.device-comfyui/ (gitignored, ~61 MB: the tree's .py
# files as one tar.xz from $COMFYUI_033, default /opt/comfy/0.33.0, plus the wheels a CUDA image
# lacks: comfy-kitchen alone is 58 MB), so it travels in a call of its own
# (carry ["bench/.device-comfyui"]); the GPU image's python must already have transformers,
# tokenizers, scipy, Pillow, numpy and safetensors, else the check stops naming what is missing.
#
# The GPU machine has no network: bench/.device/ (gitignored; ~25 MB) carries the official source
# (github.com/jixiaozhong/Sonic at 51a74ae, CC BY-NC-SA, never committed here) and the wheels its side
# needs (diffusers 0.29.0, transformers 4.43.2, huggingface_hub 0.25.2, tokenizers 0.19.1) plus ours
# (diffusers 0.42.1, importlib_metadata), installed into a temporary folder with pip --no-index.
# Results go to $OUT (the device tool's output folder) when set, else bench/.device/out/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="$ROOT/bench/.device"
OFFICIAL_GIT="${OFFICIAL_GIT:-https://github.com/jixiaozhong/Sonic}"
OFFICIAL_COMMIT=51a74aec29e100d1505b97da7c03e4db6411dcb9
OFFICIAL_WHEELS=(diffusers==0.29.0 transformers==4.43.2 huggingface_hub==0.25.2)
TOKENIZERS=tokenizers==0.19.1  # compiled: one wheel per Python version below
OURS_WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0)
PYTHONS=(3.11 3.12)  # this machine's venv, the GPU image's python3

COMFY_DEV="$ROOT/bench/.device-comfyui"
COMFYUI_033="${COMFYUI_033:-/opt/comfy/0.33.0}"
COMFY_WHEELS=(comfy-aimdo==0.4.13 comfy-kitchen==0.2.31 einops psutil pyyaml tqdm)
COMFY_PYTHON=3.12  # the GPU image's python3
DRY=0
PREPARE=0
DYNAMIC=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    --dynamic-vram) DYNAMIC=1 ;;
    --budget-s) EXTRA+=("--budget-s" "$2"); shift ;;
    -h|--help) sed -n 2,30p "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option $1 (--dry-run, --prepare, --dynamic-vram, --budget-s N)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ $DRY = 1 ] || [ $PREPARE = 1 ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
else PY=python3  # the GPU image's python, which holds its CUDA torch
fi

if [ $PREPARE = 1 ]; then
  mkdir -p "$DEV/wheels/official" "$DEV/wheels/ours"
  if [ ! -f "$DEV/official_sonic/src/pipelines/pipeline_sonic.py" ]; then
    tmp="$(mktemp -d)"
    git clone -q "$OFFICIAL_GIT" "$tmp/sonic"
    git -C "$tmp/sonic" checkout -q "$OFFICIAL_COMMIT"
    mkdir -p "$DEV/official_sonic"
    cp -r "$tmp/sonic/src" "$tmp/sonic/LICENSE" "$DEV/official_sonic/"  # code only, no example media
    rm -rf "$tmp"
  fi
  "$PY" -m pip download -q --no-deps -d "$DEV/wheels/official" "${OFFICIAL_WHEELS[@]}"
  for v in "${PYTHONS[@]}"; do
    "$PY" -m pip download -q --no-deps -d "$DEV/wheels/official" --only-binary=:all: --python-version "$v" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "$TOKENIZERS"
  done
  "$PY" -m pip download -q --no-deps -c "$ROOT/constraints.txt" -d "$DEV/wheels/ours" "${OURS_WHEELS[@]}"
  du -sh "$DEV"
  echo "prepared $DEV: carry it to the GPU machine (device tool: carry [\"bench/.device\"])"
  if [ -f "$COMFYUI_033/comfy/model_patcher.py" ]; then  # issue 31's dynamic-VRAM check
    mkdir -p "$COMFY_DEV/wheels"
    (cd "$COMFYUI_033" && find . -name '*.py' -not -path './tests*' -not -path './custom_nodes/*' -print0 |
       tar --null -T - -cJf "$COMFY_DEV/comfyui-py.tar.xz")
    "$PY" -m pip download -q --no-deps -d "$COMFY_DEV/wheels" --only-binary=:all: --python-version "$COMFY_PYTHON" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      "${COMFY_WHEELS[@]}"
    cp "$DEV"/wheels/ours/*.whl "$COMFY_DEV/wheels/"  # diffusers for our UNet, if the image lacks it
    du -sh "$COMFY_DEV"
    echo "prepared $COMFY_DEV: carry it in its own call (carry [\"bench/.device-comfyui\"]) with --dynamic-vram"
  else
    echo "no ComfyUI 0.33 tree at $COMFYUI_033 (set COMFYUI_033): --dynamic-vram not prepared" >&2
  fi
  exit 0
fi

if [ $DYNAMIC = 1 ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/sonic_dynamic_vram.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  if [ -f "$COMFY_DEV/comfyui-py.tar.xz" ]; then
    TREE="$WORK/comfyui"; mkdir -p "$TREE"; tar -xJf "$COMFY_DEV/comfyui-py.tar.xz" -C "$TREE"
  else
    TREE="$COMFYUI_033"  # a tree on this machine (dry run, or a GPU machine that has one)
  fi
  CHECK=(bench/_dynamic_vram_check.py --comfyui "$TREE" --out "${OUT:-$DEV/out}")
  [ $DRY = 1 ] && CHECK+=(--dry-run)
  shopt -s nullglob
  wheels=()  # carried wheels for what the GPU image lacks, installed for this run only
  if ! "$PY" -c "import comfy_aimdo, comfy_kitchen, einops, psutil, yaml, tqdm" >/dev/null 2>&1; then
    wheels+=("$COMFY_DEV"/wheels/*.whl)
  fi
  if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then wheels+=("$DEV"/wheels/ours/*.whl); fi
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "${wheels[@]}" >&2
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  missing="$("$PY" -c "
import importlib.util
names = ['comfy_aimdo', 'comfy_kitchen', 'einops', 'psutil', 'yaml', 'tqdm', 'transformers', 'tokenizers',
         'scipy', 'PIL', 'numpy', 'safetensors', 'diffusers']
print(' '.join(n for n in names if importlib.util.find_spec(n) is None))")"
  if [ -n "$missing" ]; then
    echo "dynamic-VRAM check skipped: $PY lacks $missing (ComfyUI 0.33's requirements)" >&2
    exit 0
  fi
  cd "$ROOT"
  "$PY" "${CHECK[@]}"
  exit $?
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sonic_device_run.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ARGS=(run --work "$WORK/run" --out "${OUT:-$DEV/out}")
if [ $DRY = 1 ]; then ARGS+=(--dry-run); else ARGS+=(--keep-going); fi  # GPU time is scarce: never waste it

# Install carried wheels once per Python into a cache outside the carried folder (no network, no index).
PYV="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
CACHE="${SONIC_DEVICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sonic-device-run}"
site() {  # site NAME WHEEL-FOLDER REQUIREMENT... -> prints the folder
  local dir="$CACHE/site-$1-py$PYV" stamp="$CACHE/site-$1-py$PYV/.installed"
  shift; local wheels="$1"; shift
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$*" ]; then
    rm -rf "$dir"
    "$PY" -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$dir" "$@" >&2
    echo "$*" > "$stamp"
  fi
  echo "$dir"
}
# the official side's packages, from the carried wheels
if [ -f "$DEV/official_sonic/src/pipelines/pipeline_sonic.py" ] && ls "$DEV"/wheels/official/*.whl >/dev/null 2>&1; then
  ARGS+=(--official-src "$DEV/official_sonic"
         --official-site "$(site official "$DEV/wheels/official" "${OFFICIAL_WHEELS[@]}" "$TOKENIZERS")")
else
  echo "no official code in $DEV (run: bash bench/device_run.sh --prepare): ours only" >&2
fi
# ours needs diffusers; the GPU image has none
if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
  OURS_SITE="$(site ours "$DEV/wheels/ours" "${OURS_WHEELS[@]}")"
  ARGS+=(--ours-site "$OURS_SITE")
  export PYTHONPATH="$OURS_SITE${PYTHONPATH:+:$PYTHONPATH}"  # the report imports sonic_core too
fi

cd "$ROOT"
"$PY" bench/_device_bench.py "${ARGS[@]}" "${EXTRA[@]}"
