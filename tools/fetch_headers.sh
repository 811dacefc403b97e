#!/usr/bin/env bash
# Header-only C++ that ships on PyPI: the cuDNN frontend (fused attention graphs) and CUTLASS
# (Hopper grouped GEMM). Extracts their include trees into .deps/ (ignored by git).
# With WHEELS=DIR it uses wheels already in DIR (a machine without a registry).
set -euo pipefail
cd "$(dirname "$0")/.."
FRONTEND=nvidia-cudnn-frontend==1.32.0
CUTLASS=nvidia-cutlass==4.2.0.0
dest=.deps
wheels=${WHEELS:-$dest/wheels}
[ -f $dest/cudnn_frontend/include/cudnn_frontend.h ] && [ -f $dest/cutlass/include/cutlass/cutlass.h ] && exit 0
mkdir -p "$wheels"
if ! ls "$wheels"/nvidia_cudnn_frontend-*.whl "$wheels"/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "$FRONTEND" "$CUTLASS"
fi
python3 - "$wheels" "$dest" <<'PY'
import glob, os, sys, zipfile
wheels, dest = sys.argv[1], sys.argv[2]
def extract(pattern, prefix, out):
    whl = sorted(glob.glob(os.path.join(wheels, pattern)))[-1]
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if n.startswith(prefix) and not n.endswith("/"):
                path = os.path.join(dest, out, "include", n[len(prefix):])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(z.read(n))
extract("nvidia_cudnn_frontend-*.whl", "include/", "cudnn_frontend")
extract("nvidia_cutlass-*.whl", "cutlass_library/source/include/", "cutlass")
PY
echo "fetch_headers: cuDNN frontend and CUTLASS headers in $dest/"
