#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/gpu_fmnist.py needs on a lent GPU machine that has PyTorch but no
# pydantic or diffusers (raymia imports them; Ray and MLflow it does not need for that script) and no
# Fashion-MNIST, and that reaches no registry:
#   .gpu_wheels/  wheels of pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions,
#                 diffusers, importlib-metadata and zipp (the versions of this venv, Linux x86_64, CPython 3.11
#                 and 3.12) and requirements.txt naming them;
#   .gpu_data/fashion-mnist/  the four IDX .gz files (from Debian's dataset-fashion-mnist).
# Both are git-ignored; name both in the device run's `carry`. diffusers' other needs (huggingface_hub >= 1.32,
# filelock, regex, requests, safetensors, numpy, Pillow) are on the GPU machine's image already.
# Then it checks, offline, that the wheels install into a fresh --target folder and that raymia's factory and
# DIFFENCE's UNet import from it with ray, mlflow and opacus unimportable.
#
#   bash benchmarks/gpu_prepare.sh            # download (cached), copy, check
#   GPU_HUB=1.33.0 bash benchmarks/gpu_prepare.sh   # also check diffusers against that huggingface_hub (the
#                                             # GPU image's; downloaded to a temporary folder, not carried)
#
# On the GPU machine (one command; docs/performance.md "GPU scripts, prepared"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --find-links .gpu_wheels \
#     -r .gpu_wheels/requirements.txt && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_fmnist.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=.gpu_wheels
DATA=.gpu_data/fashion-mnist
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
PACKAGES="pydantic pydantic-core annotated-types typing-inspection typing-extensions diffusers importlib-metadata zipp"

mkdir -p "$WHEELS" "$DATA"
: >"$WHEELS/requirements.txt"
for name in $PACKAGES; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  echo "$name==$version" >>"$WHEELS/requirements.txt"
done
for pyver in 3.11 3.12; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$WHEELS" -r "$WHEELS/requirements.txt"
done
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$DATA/$f" ] || cp "$FMNIST/$f" "$DATA/$f"
done
echo "carried: $(du -sh "$WHEELS" | cut -f1) of wheels ($(ls "$WHEELS"/*.whl | wc -l) files), $(du -sh "$DATA" | cut -f1) of data;" \
     "tracked files: $(git ls-files -z | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1) (64 MiB travel in all)"

# The check: a fresh target folder, no index, no pip configuration (this machine's points at local wheel folders).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pipi() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-index --no-deps --no-compile "$@"; }
pipi --target "$tmp/site" --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
if [ -n "${GPU_HUB:-}" ]; then  # huggingface_hub as the GPU image has it, with its HTTP client
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/hub" "huggingface_hub==$GPU_HUB" "httpx<1" httpcore
  pipi --target "$tmp/site/hub" --find-links "$tmp/hub" "huggingface_hub==$GPU_HUB" "httpx<1" httpcore
fi
for mod in ray mlflow opacus; do  # stand-ins that fail loudly on import
  mkdir -p "$tmp/blocked/$mod"
  echo "raise ImportError('$mod is not on the GPU machine')" >"$tmp/blocked/$mod/__init__.py"
done
PYTHONPATH="$tmp/blocked:$tmp/site/hub:$tmp/site:." "$PY" - "$tmp/site" <<'EOF'
import sys

site = sys.argv[1]
import raymia.pipeline.factory, raymia.diffusion.model, raymia.defenses.diffence  # noqa: E401,F401
from raymia.diffusion.model import DiffusionSpec, build_unet

build_unet(DiffusionSpec(preset="tiny"), (1, 28, 28), seed=0)  # imports diffusers' UNet2DModel
carried = ["pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "diffusers",
           "importlib_metadata", "zipp"] + (["huggingface_hub"] if "huggingface_hub" in sys.modules and
                                            sys.modules["huggingface_hub"].__file__.startswith(site) else [])
wrong = {m: sys.modules[m].__file__ for m in carried if m in sys.modules
         and not sys.modules[m].__file__.startswith(site)}
assert "pydantic" in sys.modules and "diffusers" in sys.modules
assert not wrong, f"not imported from the carried wheels: {wrong}"
for m in ("ray", "mlflow", "opacus"):
    assert m not in sys.modules, f"{m} was imported"
import diffusers, huggingface_hub, pydantic  # noqa: E401
print(f"check passed: raymia's factory and DIFFENCE's UNet import from the carried wheels (pydantic "
      f"{pydantic.VERSION}, diffusers {diffusers.__version__}, huggingface_hub {huggingface_hub.__version__}) "
      "with ray, mlflow and opacus unimportable")
EOF
