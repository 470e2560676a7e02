"""The extension is built, registered with the dispatcher, and refuses a mismatched torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import pycosdist

OPS = [
    "cosine_distance_forward",
    "cosine_distance_backward",
    "cosine_distance_forward_with_grad",
    "lib_projection_forward",
    "lib_projection_backward",
    "lib_cosine_distance_forward",
    "lib_cosine_distance_backward",
]


def test_build_info_describes_the_build():
    info = pycosdist.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["with_cuda"] in (True, False)
    assert info["with_cuda"] == (info["cuda_version"] is not None)
    assert info["simd"] in ("scalar", "avx2", "avx512")


def test_every_op_is_registered_with_a_cpu_kernel():
    for name in OPS:
        op = getattr(torch.ops.pycosdist, name).default
        assert op._schema.name == f"pycosdist::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name


def test_import_fails_readably_when_torch_differs(tmp_path: Path):
    # A copy of the installed package whose build record names another torch.
    pkg = Path(pycosdist.__file__).parent
    copy = tmp_path / "pycosdist"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "_build_config.py").write_text('TORCH_VERSION = "1.0.0"\nWITH_CUDA = False\nSIMD = "scalar"\n')
    proc = subprocess.run([sys.executable, "-c", "import pycosdist"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "built against torch 1.0.0" in proc.stderr
    assert torch.__version__ in proc.stderr
