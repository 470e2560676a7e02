"""GPU readiness, checked on the CPU: device and amp settings, the torchrun/NCCL/SyncBatchNorm decisions,
bf16 autocast end to end through the fused KD loss, loss scaling and its checkpoint, DataLoader workers,
and checkpoints that load on another device than the one they were trained on."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.serialization
from torch import nn

from pycosdist import nn as pnn
from pycosdist.denoise import config, training
from pycosdist.denoise.cli import main
from pycosdist.denoise.models import UNetConfig, UNetDenoiser
from pycosdist.denoise.synth import synthesize_corpus
from run_helpers import TINY, Interrupt, corpus, stop_after, strip_seconds, teacher_ckpt  # noqa: F401 (fixtures)

quiet = lambda *_: None
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


def _assert_same_weights(a, b, parts=("model", "kd")):
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def _distill_cfg(teacher_ckpt, *extra):
    return config.load_config(overrides=TINY + ["train.epochs=2", "kd.method=cosine_lib",
                                                f"kd.teacher={teacher_ckpt}", *extra])


# --- train.device / train.amp -----------------------------------------------------------------------
def test_device_setting_resolution():
    cpu, cuda = torch.device("cpu"), lambda i: torch.device("cuda", i)
    assert training.resolve_device("auto") == (cuda(0) if torch.cuda.is_available() else cpu)  # this machine
    assert training.resolve_device("auto", cuda_available=False) == cpu
    assert training.resolve_device("cpu", cuda_available=True, cuda_count=2) == cpu
    assert training.resolve_device("auto", cuda_available=True, cuda_count=2) == cuda(0)
    assert training.resolve_device("cuda", cuda_available=True, cuda_count=2) == cuda(0)
    assert training.resolve_device("cuda:1", cuda_available=True, cuda_count=2) == cuda(1)
    # torchrun: one GPU per LOCAL_RANK
    for spec in ("auto", "cuda"):
        assert training.resolve_device(spec, local_rank=1, world=2, cuda_available=True, cuda_count=2) == cuda(1)
    assert training.resolve_device("auto", local_rank=1, world=2, cuda_available=False) == cpu  # gloo on CPU
    with pytest.raises(ValueError, match=r"train.device: 'cuda' needs cuda:3, but only 2 CUDA device\(s\) are "
                                         r"visible \(torchrun LOCAL_RANK 3"):
        training.resolve_device("cuda", local_rank=3, world=4, cuda_available=True, cuda_count=2)
    with pytest.raises(ValueError, match=r"train.device: 'cuda:0' names one GPU, but under torchrun each of the 2"):
        training.resolve_device("cuda:0", local_rank=0, world=2, cuda_available=True, cuda_count=2)
    with pytest.raises(ValueError, match=r"train.device: 'cuda:2' needs cuda:2, but only 2 CUDA"):
        training.resolve_device("cuda:2", cuda_available=True, cuda_count=2)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"train.device: '{spec}' needs CUDA, but this torch .* sees no CUDA "
                                             r"device; use train.device=cpu \(or auto\)"):
            training.resolve_device(spec, cuda_available=False)
    for bad in ("gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", ""):
        with pytest.raises(ValueError, match=r"train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got"):
            training.resolve_device(bad)
    with pytest.raises(ValueError, match=r"--device: expected"):
        training.resolve_device("gpu", arg="--device")


def test_amp_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert training.autocast_dtype("none", cpu) is None and training.autocast_dtype("none", cuda) is None
    assert training.autocast_dtype("bf16", cpu) == training.autocast_dtype("bf16", cuda) == torch.bfloat16
    assert training.autocast_dtype("fp16", cuda) == torch.float16
    with pytest.raises(ValueError, match=r"train.amp: 'fp16' needs a CUDA device, but train.device resolved to cpu; "
                                         r"use train.amp=bf16"):
        training.autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match=r"train.amp: expected one of \['none', 'bf16', 'fp16'\], got 'fp32'"):
        training.autocast_dtype("fp32", cpu)
    assert config.DEFAULTS["train"]["device"] == "auto" and config.DEFAULTS["train"]["amp"] == "none"


@no_cuda
def test_unavailable_device_and_cpu_fp16_fail_before_any_data_is_read(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus"  # the settings are checked first: no data error
    with pytest.raises(ValueError, match="train.device: 'cuda' needs CUDA"):
        training.train(config.load_config(overrides=TINY + ["train.device=cuda"]), missing, tmp_path / "run")
    with pytest.raises(ValueError, match="train.amp: 'fp16' needs a CUDA device"):
        training.train(config.load_config(overrides=TINY + ["train.amp=fp16"]), missing, tmp_path / "run")
    for setting, message in (("train.device=cuda:1", "train.device: 'cuda:1' needs CUDA"),
                             ("train.amp=fp16", "train.amp: 'fp16' needs a CUDA device"),
                             ("train.device=tpu", "train.device: expected 'auto'")):
        assert main(["train-teacher", "--data", str(missing), "--out", str(tmp_path / "run"), "--no-progress",
                     "--set", setting]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# --- torchrun on GPUs: the decisions ----------------------------------------------------------------
def test_distributed_decisions(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert training.dist_backend(cpu) == "gloo" and training.dist_backend(cuda) == "nccl"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert training.distributed_env() == (1, 2)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert training.distributed_env() == (0, 1)

    batch = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1))
    group = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1, norm="group"))
    assert training.use_sync_batchnorm(batch, cuda, 2)
    assert not training.use_sync_batchnorm(batch, cpu, 2)  # no CPU SyncBatchNorm
    assert not training.use_sync_batchnorm(batch, cuda, 1)  # one process: nothing to synchronize
    assert not training.use_sync_batchnorm(group, cuda, 2)  # nothing to convert


def test_sync_batchnorm_conversion_keeps_parameters_and_checkpoint_keys():
    """The conversion the CUDA DDP path applies to the (model + KD) step module: in place, the same
    Parameter objects (the optimizer built before it still updates them), the same state_dict keys
    (checkpoints load into a plain BatchNorm model)."""
    torch.manual_seed(0)
    model = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1))
    kd = pnn.CosineLIBDistillationLoss(8 * 65, 10 * 65, layout="bcft")
    step = training._Step(model, kd)
    params, keys = list(step.parameters()), list(model.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    assert converted is step and step.model is model
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn > 0
    assert all(a is b for a, b in zip(params, step.parameters())) and len(params) == len(list(step.parameters()))
    assert list(model.state_dict()) == keys
    fresh = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1))
    fresh.load_state_dict(model.state_dict())


# --- bf16 autocast end to end -----------------------------------------------------------------------
def test_bf16_distillation_runs_resumes_and_keeps_the_kd_term_in_float32(corpus, teacher_ckpt, tmp_path,
                                                                         monkeypatch):
    seen = []
    real_kd_forward = pnn.CosineLIBDistillationLoss.forward
    real_enhance = UNetDenoiser.enhance_with_latent

    def kd_spy(self, student_latent, teacher_latent):
        value = real_kd_forward(self, student_latent, teacher_latent)
        seen.append(("kd", student_latent.dtype, teacher_latent.dtype, torch.is_autocast_enabled("cpu"), value.dtype))
        return value

    def enhance_spy(self, noisy):
        out = real_enhance(self, noisy)
        if torch.is_grad_enabled():  # the training forward (validation runs without grad)
            seen.append(("latent", out[1].dtype))
        return out

    monkeypatch.setattr(pnn.CosineLIBDistillationLoss, "forward", kd_spy)
    monkeypatch.setattr(UNetDenoiser, "enhance_with_latent", enhance_spy)
    cfg = _distill_cfg(teacher_ckpt, "train.amp=bf16")
    full = training.train(cfg, corpus, tmp_path / "full", progress=False, log=quiet)
    assert full["amp"] == "bf16" and full["device"] == "cpu"
    # autocast is on in the student's forward (its latent is bf16) and off in the fused KD op, which
    # gets float32 student and teacher latents and returns a float32 loss
    assert ("latent", torch.bfloat16) in seen
    assert {s for s in seen if s[0] == "kd"} == {("kd", torch.float32, torch.float32, False, torch.float32)}
    seen.clear()

    with pytest.raises(Interrupt):
        training.train(cfg, corpus, tmp_path / "split", progress=False, log=quiet, on_epoch_end=stop_after(1))
    resumed = training.train(cfg, corpus, tmp_path / "split", progress=False, log=quiet)
    a, b = (training.load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "split"))
    assert a["epoch"] == b["epoch"] == 2 and a["config"]["train"]["amp"] == "bf16"
    assert a["scaler"] == {}  # no loss scaling for bf16
    _assert_same_weights(a, b)
    assert strip_seconds(full["history"]) == strip_seconds(resumed["history"])
    for row in full["history"]:
        assert all(np.isfinite(row[k]) for k in ("train_loss", "train_task", "train_kd", "valid_loss"))

    # reference: the same run in float32. bf16 changes the numbers (so autocast did something), but
    # only by bf16 rounding: the losses stay close.
    fp32 = training.train(_distill_cfg(teacher_ckpt), corpus, tmp_path / "fp32", progress=False, log=quiet)
    ref = training.load_checkpoint(tmp_path / "fp32" / "last.pt")
    assert any(not torch.equal(ref["model"][k], a["model"][k]) for k in a["model"])
    for r32, r16 in zip(fp32["history"], full["history"]):
        for k in ("train_loss", "train_task", "train_kd", "valid_loss"):
            assert abs(r16[k] - r32[k]) <= 0.05 * abs(r32[k]), (k, r16[k], r32[k])


def test_loss_scaling_is_exact_and_its_state_is_checkpointed(corpus, teacher_ckpt, tmp_path, monkeypatch):
    """The fp16 path's GradScaler (enabled here on CPU with float32, which is the only way to run it
    without a GPU): a power-of-two scale is exact in float32, so the weights must equal the unscaled
    run's, which holds only if the gradients are unscaled BEFORE clipping (train.grad_clip is on). The
    scale doubles every step (growth_interval=1), so a resumed run ends with the uninterrupted run's
    scale only if the scaler state was saved and restored."""
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real_scaler(
        "cpu", init_scale=2.0 ** 10, growth_interval=1, enabled=True))
    cfg = _distill_cfg(teacher_ckpt)
    training.train(cfg, corpus, tmp_path / "scaled", progress=False, log=quiet)
    with pytest.raises(Interrupt):
        training.train(cfg, corpus, tmp_path / "split", progress=False, log=quiet, on_epoch_end=stop_after(1))
    first = training.load_checkpoint(tmp_path / "split" / "last.pt")["scaler"]
    training.train(cfg, corpus, tmp_path / "split", progress=False, log=quiet)
    monkeypatch.setattr(torch.amp, "GradScaler", real_scaler)
    training.train(cfg, corpus, tmp_path / "plain", progress=False, log=quiet)

    scaled, split, plain = (training.load_checkpoint(tmp_path / d / "last.pt") for d in ("scaled", "split", "plain"))
    _assert_same_weights(scaled, plain)
    _assert_same_weights(split, plain)
    steps = scaled["scheduler"]["_step_count"] - 1  # optimizer steps over both epochs
    assert first["scale"] == 2.0 ** (10 + steps // 2)
    assert scaled["scaler"]["scale"] == split["scaler"]["scale"] == 2.0 ** (10 + steps)
    assert plain["scaler"] == {}


# --- data loading -----------------------------------------------------------------------------------
def test_dataloader_workers_give_the_in_process_batches(corpus, teacher_ckpt, tmp_path, monkeypatch):
    """The CUDA loading path (DataLoader worker processes over this rank's batch list) run on CPU:
    the same batches, so the same weights, as the in-process loading, with and without the cache,
    and the global torch RNG untouched."""
    real_workers, real_loader, loaders = training.loader_workers, torch.utils.data.DataLoader, []

    class SpyLoader(real_loader):
        def __init__(self, *args, **kwargs):
            loaders.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", SpyLoader)
    for cache in ("true", "false"):
        cfg = _distill_cfg(teacher_ckpt, f"kd.teacher_cache={cache}", "train.epochs=1")
        monkeypatch.setattr(training, "loader_workers", lambda device: 0)
        training.train(cfg, corpus, tmp_path / f"inproc{cache}", progress=False, log=quiet)
        monkeypatch.setattr(training, "loader_workers", lambda device: 2)
        training.train(cfg, corpus, tmp_path / f"workers{cache}", progress=False, log=quiet)
        a, b = (training.load_checkpoint(tmp_path / f"{d}{cache}" / "last.pt") for d in ("inproc", "workers"))
        _assert_same_weights(a, b)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
        assert strip_seconds(a["history"]) == strip_seconds(b["history"])
    assert loaders == [2, 2]  # one DataLoader per epoch of the worker runs; none in-process
    assert real_workers(torch.device("cpu")) == 0
    assert real_workers(torch.device("cuda", 0)) >= 1


# --- device-agnostic checkpoints --------------------------------------------------------------------
def _save_as_if_on_cuda(state, path, monkeypatch):
    """Writes ``state`` with every storage tagged 'cuda:0', as a GPU run without to_cpu would."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        training.save_checkpoint(state, path)


def test_checkpoint_state_holds_cpu_tensors_and_keeps_its_structure():
    model = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1))
    sd = model.state_dict()
    out = training.to_cpu({"model": sd, "list": [torch.ones(2), (1, "a")], "n": 3})
    assert list(out["model"]) == list(sd) and out["model"]._metadata == sd._metadata  # BatchNorm versions kept
    assert all(out["model"][k] is sd[k] for k in sd)  # CPU tensors: no copy
    assert isinstance(out["list"][1], tuple) and out["list"][1] == (1, "a") and out["n"] == 3


@no_cuda
def test_a_checkpoint_written_on_cuda_loads_and_resumes_on_cpu(corpus, teacher_ckpt, tmp_path, monkeypatch, capsys):
    cfg = _distill_cfg(teacher_ckpt, "train.epochs=1")
    training.train(cfg, corpus, tmp_path / "run", progress=False, log=quiet)
    last = tmp_path / "run" / "last.pt"
    state = training.load_checkpoint(last)
    expected_model = training.load_model(last)[0]
    # What a GPU run of this same configuration would have written: its config says cuda, its tensors
    # claim cuda:0 (the worst case: a checkpoint written without to_cpu).
    state["config"]["train"]["device"] = "cuda"
    _save_as_if_on_cuda(state, last, monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(last, weights_only=True)  # the file really claims CUDA tensors
    # load_checkpoint maps to the CPU
    model = training.load_model(last)[0]
    noisy = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(model(noisy), expected_model(noisy), rtol=0, atol=0)
    # ... and the run continues on the CPU (train.device is not part of what must match)
    resumed = training.train(config.set_value(cfg, "train.epochs=2"), corpus, tmp_path / "run", progress=False,
                             log=quiet)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    with pytest.raises(ValueError, match=r"different configuration \(train.amp: 'none' -> 'bf16'\)"):
        training.train(config.set_value(cfg, "train.amp=bf16"), corpus, tmp_path / "run", progress=False, log=quiet)

    # the CLI: enhance with --device cpu (the default) and an unavailable --device
    src = tmp_path / "in.wav"
    sf.write(src, noisy[0].numpy(), 16000)
    assert main(["enhance", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(last), "--device", "cpu"]) == 0
    written, sr = sf.read(tmp_path / "out" / "in.wav", dtype="float32")
    with torch.no_grad():
        direct = training.load_model(last)[0](torch.from_numpy(sf.read(src, dtype="float32")[0])[None])[0]
    assert sr == 16000
    np.testing.assert_allclose(written, direct.numpy(), atol=1e-4)  # 16-bit wav rounding
    capsys.readouterr()
    for command in (["enhance", str(src), "-o", str(tmp_path / "out2"), "--checkpoint", str(last)],
                    ["evaluate", "--checkpoint", str(last), "--data", str(corpus), "--out", str(tmp_path / "ev")]):
        for device, message in (("cuda", "--device: 'cuda' needs CUDA"), ("gpu", "--device: expected 'auto'")):
            assert main(command + ["--device", device]) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "ev").exists()


def test_evaluate_with_device_cpu_matches_the_default(corpus, teacher_ckpt, tmp_path):
    args = ["evaluate", "--checkpoint", str(teacher_ckpt), "--data", str(corpus), "--workers", "0"]
    assert main(args + ["--out", str(tmp_path / "default")]) == 0
    assert main(args + ["--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("default", "cpu"))
    assert [r["pesq"] for r in a] == [r["pesq"] for r in b] and a[1]["n_ok"] == 2
