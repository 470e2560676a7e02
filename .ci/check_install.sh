#!/usr/bin/env bash
# The package as a user installs it: an sdist (must hold csrc/, CMakeLists.txt, LICENSE), a wheel
# built from that sdist with `pip wheel --no-build-isolation`, installed into a FRESH venv:
#   1. core (torch + numpy): `import pycosdist` loads nothing of the training stack, and one
#      forward + backward of each op matches the float64 reference;
#   2. the `pycosdist` command without [train] says which extra to install (exit 2);
#   3. with [train]: `pycosdist --help` works.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
OUT=$(mktemp -d /tmp/pycosdist-install.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

echo "== sdist"
$VPY -c "from scikit_build_core.build import build_sdist; print(build_sdist('$OUT/dist'))"
SDIST=$(ls "$OUT"/dist/pycosdist-*.tar.gz)
LISTING=$(tar -tzf "$SDIST")
for need in CMakeLists.txt LICENSE csrc/ops.cpp csrc/cosine_distance/cosine_distance_cpu.cpp pycosdist/__init__.py; do
  grep -q "^pycosdist-[^/]*/$need\$" <<< "$LISTING" || { echo "sdist lacks $need" >&2; exit 1; }
done

echo "== wheel from the sdist (no build isolation: builds against the installed torch)"
$VPY -m pip wheel -q --no-build-isolation --no-deps -w "$OUT/dist" "$SDIST"
WHEEL=$(ls "$OUT"/dist/pycosdist-*.whl)
# The shipped pretrained models travel inside the wheel (pycosdist.denoise.pretrained).
for f in $(git ls-files 'pycosdist/denoise/weights/*.pt'); do
  $VPY -c "import sys, zipfile; sys.exit('$f' not in zipfile.ZipFile('$WHEEL').namelist())" \
    || { echo "wheel lacks $f" >&2; exit 1; }
done

echo "== fresh venv: core install"
python3 -m venv "$OUT/venv"
FPY="$OUT/venv/bin/python"
TORCH=$($VPY -c "import torch; print(torch.__version__.split('+')[0])")
$FPY -m pip install -q "torch==$TORCH"
$FPY -m pip install -q "$WHEEL"
(cd "$OUT" && $FPY - <<'PY'
import sys, time
import torch
before = set(sys.modules)
t0 = time.perf_counter()
import pycosdist
print(f"import pycosdist after torch: {1e3 * (time.perf_counter() - t0):.0f} ms")
heavy = ("pesq", "pystoi", "soundfile", "matplotlib", "scipy", "tqdm", "espeakng_loader", "pycosdist.denoise")
loaded = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy or m.startswith("pycosdist.denoise"))
assert not loaded, f"import pycosdist loaded {loaded}"
from pycosdist import reference
torch.manual_seed(0)
s, t = torch.randn(64, 32, dtype=torch.float64, requires_grad=True), torch.randn(64, 32, dtype=torch.float64)
w1, w2 = torch.randn(96, 32, dtype=torch.float64, requires_grad=True), torch.randn(48, 96, dtype=torch.float64, requires_grad=True)
t2 = torch.randn(64, 48, dtype=torch.float64)
cases = {
    "cosine_distance_loss": (lambda f: f.cosine_distance_loss(s, t), [s]),
    "lib_projection": (lambda f: f.lib_projection(s, w1, None, w2, None).square().mean(), [s, w1, w2]),
    "lib_cosine_distance_loss": (lambda f: f.lib_cosine_distance_loss(s, t2, w1, None, w2, None), [s, w1, w2]),
}
for name, (fn, inputs) in cases.items():
    ours, ref = fn(pycosdist), fn(reference)
    g_ours, g_ref = torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    print(f"{name}: forward + backward match the reference")
PY
)
set +e
"$OUT/venv/bin/pycosdist" --help > "$OUT/help.txt" 2>&1
rc=$?
set -e
[ "$rc" = 2 ] && grep -q "\[train\]" "$OUT/help.txt" && ! grep -q Traceback "$OUT/help.txt" \
  || { echo "pycosdist without [train]: exit $rc, expected 2 and a hint" >&2; cat "$OUT/help.txt" >&2; exit 1; }
echo "without [train]: $(head -c 120 "$OUT/help.txt")..."

echo "== fresh venv: + [train]"
$FPY -m pip install -q "$WHEEL[train]"
"$OUT/venv/bin/pycosdist" --help | head -3
echo "install check passed"
