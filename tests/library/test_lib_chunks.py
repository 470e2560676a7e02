"""The fused LIB loss's automatic row chunk (pycosdist/_lib.py): the memory-budget policy with
faked budgets, the same results for every chunking against the float64 reference, and the
memory bound measured (CPU allocations through the profiler; CUDA with a device)."""

from __future__ import annotations

import pytest
import torch

import pycosdist
from pycosdist import _lib, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def make(n, d_s, e, d_t, dtype, device="cpu", seed=0):
    """student (n, d_s), teacher (n, d_t), w1, b1, w2, b2; scaled so the projection is O(1)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(  # noqa
        device=device, dtype=dtype)
    return (rnd(n, d_s), rnd(n, d_t), rnd(e, d_s, scale=d_s ** -0.5), rnd(e, scale=0.3),
            rnd(d_t, e, scale=e ** -0.5), rnd(d_t, scale=0.3))


def loss_and_grads(fn, inputs, **kwargs):
    """The 'mean' loss and the gradients of student, w1, b1, w2, b2 (the teacher is a constant)."""
    s, t, *params = [x.detach().requires_grad_(i != 1) for i, x in enumerate(inputs)]
    loss = fn(s, t, *params, **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss, [s, *params])]


# ---------------------------------------------------------------- the policy, as arithmetic

def test_chunk_rows_one_chunk_when_it_fits():
    assert _lib.chunk_rows(1000, 64, 64_000) == 1000        # exactly fits: one chunk
    assert _lib.chunk_rows(1000, 64, 10 ** 9) == 1000
    assert _lib.chunk_rows(1000, 64, 63_999) == 999         # the most rows that fit
    assert _lib.chunk_rows(1000, 64, 6_400) == 100
    assert _lib.chunk_rows(1000, 64, 10) == 1               # too small for a row: one at a time
    assert _lib.chunk_rows(1000, 64, -5) == 1
    assert _lib.chunk_rows(0, 64, 0) == 1                   # no rows: a valid chunk for an empty call
    assert _lib.chunk_rows(1000, 0, -5) == 1000             # rows that cost nothing (D_t = 0) always fit


@pytest.mark.parametrize("name,args", [("n_rows", (-1, 8, 10)), ("n_rows", (2.5, 8, 10)),
                                       ("bytes_per_row", (10, -8, 10)), ("bytes_per_row", (10, True, 10))])
def test_chunk_rows_rejects_bad_arguments(name, args):
    with pytest.raises(ValueError, match=f"`{name}` must be an int >= 0, got"):
        _lib.chunk_rows(*args)


SHAPES = [(65536, 256, 1024, 512), (131072, 128, 512, 512), (262144, 64, 256, 256), (8192, 512, 2048, 1024)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d_s,e,d_t", SHAPES)
@pytest.mark.parametrize("with_grad", [True, False])
def test_cuda_chunk_is_the_most_rows_within_a_quarter_of_eager(n, d_s, e, d_t, dtype, with_grad):
    """The CUDA chunk: the op's buffers (fixed + chunk rows) stay within 25% of the reference's
    peak, and one more row would not (or all rows fit: one chunk); or, where not even
    MIN_CHUNK_ROWS rows fit, the floor."""
    chunk = _lib.auto_chunk_size(n, d_s, e, d_t, dtype, "cuda", with_grad)
    fixed, per_row = _lib.fused_bytes(n, d_s, e, d_t, dtype, with_grad)
    budget = 0.25 * _lib.eager_peak_bytes(n, d_s, e, d_t, dtype)
    assert 1 <= chunk <= n
    if fixed + _lib.MIN_CHUNK_ROWS * per_row > budget:
        assert chunk == _lib.MIN_CHUNK_ROWS
        return
    assert fixed + chunk * per_row <= budget
    assert chunk == n or fixed + (chunk + 1) * per_row > budget


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_chunk_one_chunk_under_a_large_budget_and_a_floor_under_a_tiny_one(monkeypatch, dtype):
    monkeypatch.setattr(_lib, "memory_budget_bytes", lambda *a: 1 << 40)
    assert _lib.auto_chunk_size(65536, 256, 1024, 512, dtype, "cuda", True) == 65536
    monkeypatch.setattr(_lib, "memory_budget_bytes", lambda *a: 0)
    assert _lib.auto_chunk_size(65536, 256, 1024, 512, dtype, "cuda", True) == _lib.MIN_CHUNK_ROWS
    assert _lib.auto_chunk_size(300, 256, 1024, 512, dtype, "cuda", True) == 300


def test_cpu_keeps_its_cache_sized_chunks():
    assert _lib.auto_chunk_size(65536, 256, 1024, 512, torch.float32, "cpu", True) == 0


class RecordingOps:
    """Stands in for torch.ops.pycosdist in pycosdist._lib: records the chunk_size each call passes."""

    def __init__(self):
        self.chunks = []

    def __getattr__(self, name):
        op = getattr(torch.ops.pycosdist, name)

        def call(*args):
            if name.startswith("lib_cosine_distance"):
                self.chunks.append(args[7] if name.endswith("forward") else args[-1])
            return op(*args)
        return call


@pytest.mark.parametrize("with_grad", [True, False])
def test_the_loss_passes_the_policys_chunk_to_the_op(monkeypatch, with_grad):
    """chunk_size=None asks auto_chunk_size about this call (rows, widths, dtype, device, whether
    gradients are computed) and hands its answer to the op; an explicit chunk_size goes as given."""
    n, d_s, e, d_t = 700, 16, 64, 24
    asked = []

    def policy(*args):
        asked.append(args)
        return 123
    monkeypatch.setattr(_lib, "auto_chunk_size", policy)
    monkeypatch.setattr(_lib, "_ops", RecordingOps())
    s, t, *params = make(n, d_s, e, d_t, torch.float32)
    for x in (s, *params):
        x.requires_grad_(with_grad)
    pycosdist.lib_cosine_distance_loss(s, t, *params)
    pycosdist.lib_cosine_distance_loss(s, t, *params, chunk_size=333)
    assert asked == [(n, d_s, e, d_t, torch.float32, "cpu", with_grad)]
    assert _lib._ops.chunks == [123, 333]


# ---------------------------------------------------------------- every chunking, the same result

def fake_budget_for(chunks, n, d_s, e, d_t, dtype):
    """A budget under which the CUDA policy cuts n rows into `chunks` chunks."""
    fixed, per_row = _lib.fused_bytes(n, d_s, e, d_t, dtype, True)
    return fixed + -(-n // chunks) * per_row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_every_chunking_the_policy_picks_gives_the_reference_result(monkeypatch, dtype, chunks):
    """Budgets faked for 1, 2, 3 and 7 chunks of 2500 rows (the floor lowered to let them
    through): the chunk the policy picks, run by the op (here the CPU kernel), gives the float64
    reference's loss and gradients."""
    n, d_s, e, d_t = 2500, 24, 96, 40
    budget = fake_budget_for(chunks, n, d_s, e, d_t, dtype)
    monkeypatch.setattr(_lib, "memory_budget_bytes", lambda *a: budget)
    monkeypatch.setattr(_lib, "MIN_CHUNK_ROWS", 1)
    chunk = _lib.auto_chunk_size(n, d_s, e, d_t, dtype, "cuda", True)
    assert -(-n // chunk) == chunks
    inputs = make(n, d_s, e, d_t, dtype)
    want = loss_and_grads(reference.lib_cosine_distance_loss, [x.double() for x in inputs])
    got = loss_and_grads(pycosdist.lib_cosine_distance_loss, inputs, chunk_size=chunk)
    for name, g, w in zip(("loss", "student", "w1", "b1", "w2", "b2"), got, want):
        assert g.dtype == dtype, name
        err = (g.double() - w).abs().max().item()
        assert err <= TOL[dtype] * max(w.abs().max().item(), 1e-30), f"{name}: {chunks} chunks, error {err:.3g}"


# ---------------------------------------------------------------- the bound, measured (CPU)

def peak_allocated_bytes(fn) -> int:
    """Peak bytes allocated and not yet freed while fn runs, from the profiler's allocation events
    (every tensor the step allocates: intermediates, saved tensors, the gradients it returns)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_bound_and_the_cpu_ops_peak_measured(dtype):
    """eager_peak_bytes is a lower bound of the reference's measured peak, and not a loose one;
    the fused op's measured peak (CPU kernel, automatic chunks) is within 25% of eager's. The CPU
    kernel's chunk buffers (a few MiB) are per thread: measured at 2 threads, a typical N."""
    n, d_s, e, d_t = 65536, 128, 512, 256
    inputs = make(n, d_s, e, d_t, dtype)
    peaks = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, fn in (("eager", reference.lib_cosine_distance_loss),
                         ("fused", pycosdist.lib_cosine_distance_loss)):
            loss_and_grads(fn, inputs)  # first call: lazily allocated library state stays out of the peak
            peaks[name] = peak_allocated_bytes(lambda fn=fn: loss_and_grads(fn, inputs))
    finally:
        torch.set_num_threads(threads)
    bound = _lib.eager_peak_bytes(n, d_s, e, d_t, dtype)
    assert 0.7 * peaks["eager"] <= bound <= peaks["eager"], (bound, peaks)
    assert peaks["fused"] <= 0.25 * peaks["eager"], peaks


# ---------------------------------------------------------------- CUDA (make gpu-check)

cuda = pytest.mark.skipif(not torch.cuda.is_available() or not pycosdist.build_info()["with_cuda"],
                          reason="needs a CUDA device and the CUDA kernels")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_peak_within_a_quarter_of_eager(dtype):
    """The issue's size: the automatic chunk keeps the op's peak (above inputs and parameters)
    within 25% of the eager reference's, both measured by the caching allocator."""
    n, d_s, e, d_t = 65536, 256, 1024, 512
    inputs = make(n, d_s, e, d_t, dtype, device="cuda")
    peaks = {}
    for name, fn in (("eager", reference.lib_cosine_distance_loss), ("fused", pycosdist.lib_cosine_distance_loss)):
        loss_and_grads(fn, inputs)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_and_grads(fn, inputs)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["fused"] <= 0.25 * peaks["eager"], peaks


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 3])
def test_cuda_faked_budgets_give_the_reference_result(monkeypatch, dtype, chunks):
    n, d_s, e, d_t = 2500, 24, 96, 40
    budget = fake_budget_for(chunks, n, d_s, e, d_t, dtype)
    monkeypatch.setattr(_lib, "memory_budget_bytes", lambda *a: budget)
    monkeypatch.setattr(_lib, "MIN_CHUNK_ROWS", 1)
    inputs = make(n, d_s, e, d_t, dtype, device="cuda")
    want = loss_and_grads(reference.lib_cosine_distance_loss, [x.double() for x in inputs])
    got = loss_and_grads(pycosdist.lib_cosine_distance_loss, inputs)  # chunk_size=None: the policy
    for name, g, w in zip(("loss", "student", "w1", "b1", "w2", "b2"), got, want):
        err = (g.double() - w).abs().max().item()
        assert err <= TOL[dtype] * max(w.abs().max().item(), 1e-30), f"{name}: {chunks} chunks, error {err:.3g}"
