#!/usr/bin/env bash
# Build the private venv that benchmarks/trainer_speed.py runs in, holding the peers we compare against:
#   learn2learn 0.2.0 (l2l.algorithms.MAML) and higher 0.2.1 (higher.innerloop_ctx),
# beside exactly the same torch as the project (2.13.0, CPU). Not a product dependency: everything goes
# into benchmarks/.peers/ (gitignored), never into the project's .venv.
#
# Idempotent: re-running skips whatever is already in place. Usage:
#   bash benchmarks/setup_peers.sh            # then
#   benchmarks/.peers/venv/bin/python benchmarks/trainer_speed.py --out ...
#
# Why it is not `pip install learn2learn higher`:
#  * learn2learn's install_requires has an open `torch>=1.1.0` / `torchvision>=0.3.0`; resolved, that swaps
#    the CPU torch for a multi-GB CUDA build. Everything below is installed with --no-deps, dependencies by hand.
#  * learn2learn 0.2.0's sdist ships Cython-0.29-generated C that does not compile on Python 3.11
#    (`longintrepr.h: No such file or directory`); we regenerate the C with a current Cython (`cython -3`).
#  * learn2learn imports torchvision at import time. The torchvision wheels available for torch 2.13.0 do not
#    load beside the +cpu torch (`RuntimeError: operator torchvision::nms does not exist`), so the venv gets an
#    empty placeholder `torchvision` package. The MAML path never touches it; anything that does use it
#    raises a clear error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="${PEERS_DIR:-$HERE/.peers}"   # override for a throwaway build: PEERS_DIR=/tmp/x
VENV="$PEERS/venv"
SRC="$PEERS/src"
PY="$VENV/bin/python"
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)

TORCH_VERSION="2.13.0"      # must equal the project's pin (pyproject.toml [train])
L2L_VERSION="0.2.0"
HIGHER_VERSION="0.2.1"

log() { printf '[setup_peers] %s\n' "$*"; }

mkdir -p "$PEERS" "$SRC"

if [ ! -x "$PY" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi

have() { "$PY" - "$@" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    got = version(name)
    if want and got.split("+")[0] != want:
        sys.exit(1)
EOF
}

# 1. torch, pinned exactly (never unpinned: that can pull a CUDA build), plus what the benchmark and the
#    project's meta_train package import (numpy, pyyaml).
if ! have "torch==$TORCH_VERSION" numpy PyYAML; then
    log "installing torch==$TORCH_VERSION numpy pyyaml"
    "${PIP[@]}" "torch==$TORCH_VERSION" numpy pyyaml
fi

# 2. learn2learn's import-time dependencies, by hand (its install_requires minus torch/torchvision/gsutil/qpth:
#    gsutil is only used by dataset downloaders, qpth is optional and guarded by learn2learn itself).
#    gym 0.26.2's own deps are cloudpickle and gym_notices; --no-deps keeps resolution away from torch.
if ! have tqdm requests scipy pillow gym cloudpickle gym_notices Cython; then
    log "installing learn2learn's runtime deps (no-deps each)"
    "${PIP[@]}" tqdm requests charset-normalizer idna urllib3 certifi scipy pillow cloudpickle gym_notices "cython>=3"
    "${PIP[@]}" --no-deps --no-build-isolation "gym==0.26.2"
fi

# 3. placeholder torchvision (see header). Any attribute is a class that refuses to be used, so
#    `from torchvision.transforms import Compose` and `class X(ImageFolder)` both import fine.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TV="$SITE/torchvision"
if [ ! -f "$TV/_placeholder" ]; then
    log "writing placeholder torchvision package into $SITE"
    rm -rf "$TV"
    mkdir -p "$TV/datasets" "$TV/transforms" "$TV/models" "$TV/io" "$TV/utils"
    cat > "$TV/_stub.py" <<'EOF'
"""Placeholder torchvision for the benchmark peers venv: importable, unusable."""


def make_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _refuse(*args, **kwargs):
            raise RuntimeError(
                f"{module_name}.{name}: this venv has a placeholder torchvision (benchmarks/setup_peers.sh); "
                "real torchvision does not load beside torch 2.13.0+cpu"
            )

        return type(name, (), {"__init__": _refuse, "__call__": _refuse, "__module__": module_name})

    return __getattr__
EOF
    for mod in "" datasets transforms models io utils; do
        dir="$TV${mod:+/$mod}"
        dotted="torchvision${mod:+.$mod}"
        {
            echo "from torchvision._stub import make_getattr as _mg"
            echo "__getattr__ = _mg('$dotted')"
            if [ -z "$mod" ]; then
                echo "__version__ = '0.0.0+placeholder'"
                echo "from . import datasets, transforms, models, io, utils  # noqa: E402,F401"
            fi
            if [ "$mod" = datasets ]; then
                echo "from . import folder, omniglot  # noqa: E402,F401"
            fi
            if [ "$mod" = transforms ]; then
                echo "from . import functional  # noqa: E402,F401"
            fi
        } > "$dir/__init__.py"
    done
    for sub in datasets/folder datasets/omniglot transforms/functional; do
        dotted="torchvision.${sub//\//.}"
        printf "from torchvision._stub import make_getattr as _mg\n__getattr__ = _mg('%s')\n" "$dotted" > "$TV/$sub.py"
    done
    touch "$TV/_placeholder"
fi

# 4. learn2learn from its sdist, with the Cython C regenerated for Python 3.11.
if ! have "learn2learn==$L2L_VERSION"; then
    L2L_DIR="$SRC/learn2learn-$L2L_VERSION"
    if [ ! -d "$L2L_DIR" ]; then
        log "downloading learn2learn==$L2L_VERSION sdist"
        "$VENV/bin/pip" download --disable-pip-version-check -q --no-binary :all: --no-deps --no-build-isolation \
            "learn2learn==$L2L_VERSION" -d "$SRC"
        tar -xzf "$SRC/learn2learn-$L2L_VERSION.tar.gz" -C "$SRC"
    fi
    log "regenerating learn2learn's Cython C (cython -3)"
    for pyx in "$L2L_DIR"/learn2learn/data/*.pyx; do
        "$VENV/bin/cython" -3 "$pyx" -o "${pyx%.pyx}.c"
    done
    log "building + installing learn2learn (--no-deps --no-build-isolation)"
    "${PIP[@]}" --no-deps --no-build-isolation "$L2L_DIR"
fi

# 5. higher: pure Python, no deps beyond torch.
if ! have "higher==$HIGHER_VERSION"; then
    log "installing higher==$HIGHER_VERSION"
    "${PIP[@]}" --no-deps "higher==$HIGHER_VERSION"
fi

# 6. check: the peers import, torch is still the CPU 2.13.0, and the repo's meta_train imports from /work/main.
log "verifying"
(cd "$HERE/.." && "$PY" - <<EOF
import contextlib, io, sys
sys.path.insert(0, ".")
import torch, higher
with contextlib.redirect_stderr(io.StringIO()):  # gym's import-time deprecation banner
    import learn2learn as l2l
from importlib.metadata import version
import meta_train.algorithms
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
print(f"[setup_peers] ok: torch {torch.__version__}, learn2learn {l2l.__version__}, higher {version('higher')}, "
      f"meta_train from {meta_train.algorithms.__file__}")
EOF
)
