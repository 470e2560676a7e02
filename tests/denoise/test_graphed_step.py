"""The static (compiled / CUDA-graph) training step: the same loss curve as the eager step, and
clear errors for what it cannot do."""

from __future__ import annotations

import pytest
import torch

from pycosdist.denoise import distill
from pycosdist.denoise.graphed_step import StaticStep, distillation_loss_fn
from pycosdist.denoise.models import build_model, preset

STEPS = 20
BATCH, SAMPLES = 2, 128 * 15  # 16 frames


def batches(n, device="cpu"):
    """n (noisy, clean) pairs: harmonic 'speech' in white noise, a fixed seed per batch."""
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        t = torch.arange(SAMPLES) / 16000
        f0 = 100 + 200 * torch.rand(BATCH, 1, generator=g)
        clean = 0.1 * sum(torch.sin(2 * torch.pi * k * f0 * t) / k for k in range(1, 4))
        out.append(((clean + 0.05 * torch.randn(BATCH, SAMPLES, generator=g)).to(device), clean.to(device)))
    return out


def setup(mode, device="cpu", **kw):
    """A tiny teacher / student pair with the fused cosine + LIB KD, AdamW, and its static step;
    the same initial weights for every mode."""
    torch.manual_seed(0)
    # one level, one bottleneck layer: the fewest kernels for inductor to compile (a cold CPU compile
    # of a 2-level model took minutes on a loaded 2-core machine)
    teacher = distill.freeze(build_model(preset("teacher", channels=(4,), bottleneck_layers=1)).to(device))
    student = build_model(preset("teacher", channels=(2,), bottleneck_layers=1)).to(device)
    c_s, f_s, _ = student.latent_shape()
    c_t, f_t, _ = teacher.latent_shape()
    kd = distill.make_kd_loss("cosine_lib", (c_s, f_s, 1), (c_t, f_t, 1), expansion=2).to(device)
    params = [*student.parameters(), *kd.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, **kw)
    step = StaticStep(distillation_loss_fn(student, kd, distill.task_loss, 0.5, None), params, opt, mode=mode,
                      grad_clip=1.0)
    return teacher, step


def loss_curve(mode, device="cpu", steps=STEPS, **kw):
    teacher, step = setup(mode, device, **kw)
    curve = []
    for noisy, clean in batches(steps, device):
        t_lat = distill.teacher_latent(teacher, noisy)  # the static teacher-latent buffer's contents
        losses = step(noisy, clean, t_lat)
        curve.append([float(losses[k]) for k in ("loss", "task", "kd")])
    return torch.tensor(curve, dtype=torch.float64)


def test_compiled_step_has_the_eager_loss_curve():
    eager, compiled = loss_curve("eager"), loss_curve("compile")
    assert eager[-1, 0] < eager[0, 0]  # it trains: the curve is not flat
    # float32, 20 AdamW steps: inductor's fused kernels round differently, nothing more
    torch.testing.assert_close(compiled, eager, rtol=2e-4, atol=1e-5)


def test_static_step_refuses_another_shape():
    teacher, step = setup("eager")
    noisy, clean = batches(1)[0]
    step(noisy, clean, distill.teacher_latent(teacher, noisy))
    with pytest.raises(ValueError, match="same shapes, dtypes and devices on every call"):
        step(noisy[:1], clean[:1], distill.teacher_latent(teacher, noisy[:1]))


@pytest.mark.parametrize("kwargs,match", [(dict(mode="graphs"), "mode: expected one of"),
                                          (dict(mode="eager", warmup=-1), "warmup: expected an int >= 0"),
                                          (dict(mode="eager", grad_clip=-1.0), "grad_clip: expected a number >= 0")])
def test_static_step_argument_errors(kwargs, match):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=match):
        StaticStep(lambda: {"loss": p.sum()}, [p], torch.optim.SGD([p], lr=0.1), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_graphs_needs_cuda():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        StaticStep(lambda: {"loss": p.sum()}, [p], torch.optim.SGD([p], lr=0.1), mode="cuda_graphs")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_graphs_needs_a_capturable_optimizer():
    p = torch.nn.Parameter(torch.zeros(2, device="cuda"))
    with pytest.raises(ValueError, match="capturable optimizer"):
        StaticStep(lambda: {"loss": p.sum()}, [p], torch.optim.AdamW([p], lr=0.1), mode="cuda_graphs")


@cuda
@pytest.mark.parametrize("mode", ["compile", "cuda_graphs"])
def test_cuda_static_step_has_the_eager_loss_curve(mode):
    eager = loss_curve("eager", "cuda", capturable=True)
    static = loss_curve(mode, "cuda", capturable=True)
    torch.testing.assert_close(static, eager, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- train.cuda_graphs (the training hook)

def test_cuda_graphs_setting_is_checked_before_a_run():
    from pycosdist.denoise import config, training

    cfg = config.load_config(overrides=["train.cuda_graphs=true", "train.device=cpu"])
    with pytest.raises(ValueError, match=r"train.cuda_graphs: captures the step in a CUDA graph and needs a CUDA "
                                         r"device, but the run is on cpu"):
        training.check_train_config(cfg)


@pytest.mark.parametrize("amp,world,match", [("fp16", 1, "fp16's GradScaler"), ("bf16", 2, "one process only")])
def test_cuda_graphs_refuses_what_a_graph_cannot_hold(amp, world, match):
    from pycosdist.denoise.graphed_step import check_cuda_graphs

    with pytest.raises(ValueError, match=match):
        check_cuda_graphs(torch.device("cuda"), amp, world)
    check_cuda_graphs(torch.device("cuda"), "bf16", 1)  # what it accepts: no error


@cuda
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_training_step_with_cuda_graphs_has_the_eager_losses(amp):
    """TrainStep.run with train.cuda_graphs: the eager step's losses (and lr schedule) over 12 steps,
    the last batch smaller (it runs eagerly)."""
    from pycosdist.denoise import config
    from pycosdist.denoise.step import TrainStep

    curves = {}
    for graphs in (False, True):
        cfg = config.load_config(overrides=["model.channels=[4, 8]", "model.bottleneck_layers=1", f"train.amp={amp}",
                                            f"train.cuda_graphs={str(graphs).lower()}", "train.device=cuda"])
        torch.manual_seed(0)
        step = TrainStep(cfg, torch.device("cuda"), torch.bfloat16 if amp == "bf16" else None, 16, 12)
        data = batches(12, "cuda")
        data[-1] = (data[-1][0][:1], data[-1][1][:1])
        curves[graphs] = torch.tensor([[float(v) for v in step.run(noisy, clean, None, 1.0, 1, "test").values()]
                                       for noisy, clean in data])
        curves[graphs, "lr"] = float(step.optimizer.param_groups[0]["lr"])
    torch.testing.assert_close(curves[True], curves[False], rtol=1e-3, atol=1e-5)
    assert curves[True, "lr"] == pytest.approx(curves[False, "lr"])
