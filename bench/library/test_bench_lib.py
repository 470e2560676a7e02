"""pytest-benchmark suite: fused LIB + cosine distance loss forward + backward vs the unfused
reference, eager and torch.compile'd, the hand-folded eager formulation, and lib_projection vs two F.linear calls (one benchmark
group per case). Memory is measured by bench/library/bench_lib.py.

    PYTHONPATH=. .venv/bin/pytest -q bench/test_bench_lib.py
"""

from __future__ import annotations

import pytest
import torch

import pycosdist
from bench_lib import D_T, VARIANTS, fwd_bwd, loss_fn, make_inputs

N = 16384


@pytest.mark.parametrize("variant", VARIANTS)
def test_lib_cosine_loss_fwd_bwd(benchmark, variant):
    student, teacher, params = make_inputs(N)
    step = fwd_bwd(loss_fn(variant), student, teacher, params)
    step()  # compile / first touch
    benchmark.group = f"LIB + cosine loss fwd+bwd float32 N={N} D_s=128 E=512 D_t=512"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


def _two_linears(x, w1, b1, w2, b2):
    return torch.nn.functional.linear(torch.nn.functional.linear(x, w1, b1), w2, b2)


@pytest.mark.parametrize("impl", ["lib_projection", "2x F.linear"])
def test_lib_projection_fwd_bwd(benchmark, impl):
    x, _, params = make_inputs(N)
    fn = pycosdist.lib_projection if impl == "lib_projection" else _two_linears
    inputs = [x, *params]
    grad = torch.randn(N, D_T)
    step = lambda: torch.autograd.grad(fn(*inputs), inputs, grad)  # noqa: E731
    step()
    benchmark.group = f"LIB projection fwd+bwd float32 N={N}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
