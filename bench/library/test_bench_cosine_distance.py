"""pytest-benchmark suite: cosine_distance loss forward + backward, pycosdist vs the eager and
torch.compile'd reference and the compiled hand formulation, side by side per size (one benchmark group per size).

    cd bench/library && PYTHONPATH=../.. ../../.venv/bin/pytest -q test_bench_cosine_distance.py
"""

from __future__ import annotations

import pytest
import torch

from bench_cosine_distance import fwd_bwd, implementations

SIZES = [(16384, 256), (65536, 512)]
IMPLS = ["pycosdist", "eager", "compile", "hand compile"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", SIZES, ids=[f"{n}x{d}" for n, d in SIZES])
def test_cosine_distance_fwd_bwd(benchmark, impl, n, d):
    torch.manual_seed(0)
    student = torch.randn(n, d, requires_grad=True)
    teacher = torch.randn(n, d)
    step = fwd_bwd(*implementations()[impl][:1], student, teacher)
    step()  # compile / first touch
    benchmark.group = f"cosine_distance fwd+bwd float32 {n}x{d}"
    benchmark.pedantic(step, rounds=5 if impl == "eager" else 20, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = 3 * n * d * 4 / benchmark.stats.stats.median / 1e9
