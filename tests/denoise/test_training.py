"""Config files and overrides; training steps; exact resume; atomic checkpoints; the teacher cache."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pycosdist.denoise import config, distill, training
from pycosdist.denoise.data import load_corpus
from pycosdist.denoise.models import HOP, UNetConfig, UNetDenoiser
from pycosdist.denoise.synth import synthesize_corpus
from run_helpers import TINY, Interrupt, corpus, stop_after, strip_seconds, teacher_ckpt  # noqa: F401 (fixtures)



# --- config -----------------------------------------------------------------------------------------
def test_override_typing():
    cfg = config.load_config(overrides=["train.lr=1e-3", "train.epochs=3", "kd.bias=false", "kd.method=cosine_lib",
                                        "model.channels=[8, 16]", "kd.lambda=2"])
    assert cfg["train"]["lr"] == 1e-3 and type(cfg["train"]["epochs"]) is int and cfg["train"]["epochs"] == 3
    assert cfg["kd"]["bias"] is False and cfg["kd"]["method"] == "cosine_lib"
    assert cfg["model"]["channels"] == [8, 16] and cfg["kd"]["lambda"] == 2.0 and type(cfg["kd"]["lambda"]) is float
    assert config.DEFAULTS["train"]["epochs"] == 10  # defaults untouched
    with pytest.raises(ValueError, match=r"train.epochs: expected a int, got '1.5'"):
        config.load_config(overrides=["train.epochs=1.5"])
    with pytest.raises(ValueError, match="kd.bias: expected a boolean"):
        config.load_config(overrides=["kd.bias=maybe"])
    with pytest.raises(ValueError, match="model.channels: expected a list"):
        config.load_config(overrides=["model.channels=8"])
    with pytest.raises(ValueError, match="section.key=value"):
        config.load_config(overrides=["train.lr"])


def test_unknown_keys_are_rejected_with_the_valid_ones(tmp_path):
    with pytest.raises(KeyError, match=r"unknown config key 'train.lrate'; valid keys: .*train\.lr,"):
        config.load_config(overrides=["train.lrate=1"])
    with pytest.raises(KeyError, match="unknown config key 'optim.lr'"):
        config.load_config(overrides=["optim.lr=1"])
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 0.01\nepochs = 4\n[kd]\nlambda = 3\n")
    cfg = config.load_config(f, ["train.epochs=5"])
    assert (cfg["train"]["lr"], cfg["train"]["epochs"], cfg["kd"]["lambda"]) == (0.01, 5, 3.0)
    f.write_text("[train]\nbatchsize = 4\n")
    with pytest.raises(KeyError, match="'train.batchsize'.*train.batch_size"):
        config.load_config(f)
    f.write_text("[train]\nlr = 'fast'\n")
    with pytest.raises(ValueError, match="train.lr: expected a float"):
        config.load_config(f)
    # to_toml round-trips
    f.write_text(config.to_toml(cfg))
    assert config.load_config(f) == cfg


# --- steps ------------------------------------------------------------------------------------------
def test_training_steps_reduce_task_and_kd_loss():
    torch.manual_seed(0)
    model = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1))
    teacher = distill.freeze(UNetDenoiser(UNetConfig(channels=(6, 10), kernel_size=(3, 3), bottleneck_layers=1)))
    clean = 0.1 * torch.sin(torch.arange(4000) * 0.05).repeat(4, 1)
    noisy = clean + 0.05 * torch.randn(4, 4000)
    t_lat = distill.teacher_latent(teacher, noisy)
    kd = distill.make_kd_loss("cosine_lib", model.latent_shape(), teacher.latent_shape())
    opt = torch.optim.Adam(list(model.parameters()) + list(kd.parameters()), lr=3e-3)

    def losses():
        enhanced, latent, spec = model.enhance_with_latent(noisy)
        return distill.task_loss(spec, enhanced, clean, model.stft), kd(latent, t_lat)

    task0, kd0 = (v.item() for v in losses())
    for _ in range(15):
        task, kdv = losses()
        opt.zero_grad()
        (task + kdv).backward()
        opt.step()
    task1, kd1 = (v.item() for v in losses())
    assert task1 < 0.9 * task0 and kd1 < 0.9 * kd0


# --- resume -----------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted_run(corpus, teacher_ckpt, tmp_path):
    cfg = config.load_config(overrides=TINY + ["train.epochs=2", "kd.method=cosine_lib", f"kd.teacher={teacher_ckpt}"])
    quiet = lambda *_: None
    full = training.train(cfg, corpus, tmp_path / "full", progress=False, log=quiet)
    with pytest.raises(Interrupt):
        training.train(cfg, corpus, tmp_path / "split", progress=False, log=quiet, on_epoch_end=stop_after(1))
    assert training.load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    resumed = training.train(cfg, corpus, tmp_path / "split", progress=False, log=quiet)
    a, b = (training.load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "split"))
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "kd"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert a["kd"] and any(v.dim() == 2 for v in a["kd"].values())  # the LIB weights are checkpointed
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    assert strip_seconds(full["history"]) == strip_seconds(resumed["history"])
    # history files
    rows = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and {"train_loss", "train_task", "train_kd", "valid_loss"} <= rows[0].keys()
    assert (tmp_path / "split" / "history.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")
    # a finished run is not retrained; a different config is refused
    again = training.train(cfg, corpus, tmp_path / "split", progress=False, log=quiet)
    assert strip_seconds(again["history"]) == strip_seconds(full["history"])
    with pytest.raises(ValueError, match=r"different configuration \(train.lr: 0.002 -> 0.001\)"):
        training.train(config.set_value(cfg, "train.lr=1e-3"), corpus, tmp_path / "split", progress=False, log=quiet)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    training.save_checkpoint({"format": "pycosdist", "model_config": {}, "n": 1}, path)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint({"format": "pycosdist", "model_config": {}, "n": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert training.load_checkpoint(path)["n"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        training.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable pycosdist checkpoint"):
        training.load_checkpoint(tmp_path / "junk.pt")


def test_teacher_cache_crops_match_teacher_on_the_crop(corpus, teacher_ckpt):
    teacher = distill.freeze(training.load_model(teacher_ckpt)[0])
    base = load_corpus(corpus, valid_speakers=1, segment_seconds=None).train
    crops = training.FrameAlignedCrops(base, 0.5, seed=0)
    assert crops.segment % HOP == 0
    cache = training.TeacherLatentCache(lambda x: distill.teacher_latent(teacher, x), crops)
    frames = crops.segment // HOP + 1
    edge = 6  # receptive field (kernel 3 in time: 2 encoder + 1 bottleneck layers) + STFT edge frames
    checked = 0
    for epoch in range(3):
        crops.set_epoch(epoch)
        for i in range(len(crops)):
            noisy, clean, idx, k = crops[i]
            assert noisy.shape == clean.shape == (crops.segment,) and idx == i
            assert torch.equal(noisy, base[i][0][k * HOP:k * HOP + crops.segment])
            direct = distill.teacher_latent(teacher, noisy[None])
            cached = cache.get([i], [k], frames)
            assert cached.shape == direct.shape
            torch.testing.assert_close(cached[..., edge:-edge], direct[..., edge:-edge], rtol=1e-4, atol=1e-5)
            checked += k > 0
    assert checked > 0  # some crops did not start at 0


def test_teacher_cache_is_reused_by_the_next_run_with_the_same_teacher(corpus, teacher_ckpt, tmp_path):
    cfg = config.load_config(overrides=TINY + ["train.epochs=1", "kd.method=cosine_lib", f"kd.teacher={teacher_ckpt}"])
    logs = []

    def run(name):
        logs.clear()
        summary = training.train(cfg, corpus, tmp_path / name, progress=False, log=logs.append)
        return summary, torch.load(tmp_path / name / "last.pt", weights_only=False)["model"]

    training._LAST_TEACHER_CACHE.clear()
    _, fresh = run("fresh")
    assert any("teacher latents cached" in m for m in logs)
    _, reused = run("reused")
    assert any("reused from the previous run" in m for m in logs)
    for k in fresh:  # a reused cache trains exactly like a computed one
        assert torch.equal(fresh[k], reused[k]), k
    # a rewritten teacher file is a different teacher: the latents are computed again
    copy = tmp_path / "teacher_copy.pt"
    copy.write_bytes(Path(teacher_ckpt).read_bytes())
    training.train(config.merge(cfg, {"kd": {"teacher": str(copy)}}), corpus, tmp_path / "other", progress=False,
                   log=logs.append)
    assert any("teacher latents cached" in m for m in logs)


def test_train_argument_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="kd.teacher: KD method 'cosine_lib' needs a teacher"):
        training.train(config.load_config(overrides=TINY + ["kd.method=cosine_lib"]), corpus, tmp_path)
    with pytest.raises(ValueError, match="train.valid_metric"):
        training.train(config.load_config(overrides=TINY + ["train.valid_metric=stoi"]), corpus, tmp_path)


def test_remix_permutes_noise_and_scales_within_bounds():
    clean = torch.arange(1, 5, dtype=torch.float32)[:, None] * torch.ones(4, 50)  # row i: i + 1
    noise = 0.1 * torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    noisy2, clean2 = training.remix(clean + noise, clean, rng, snr_shift_db=5.0, gain_db=6.0)
    gain = clean2[:, 0] / clean[:, 0]
    assert torch.allclose(clean2, gain[:, None] * clean)
    assert ((gain > 10 ** (-6 / 20) - 1e-6) & (gain < 10 ** (6 / 20) + 1e-6)).all()
    new_noise = (noisy2 - clean2) / gain[:, None]
    used = []
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    for row in new_noise:  # a positive multiple of exactly one original noise row
        j = [k for k in range(4) if torch.allclose(unit(row), unit(noise[k]), atol=1e-3)]
        assert len(j) == 1
        assert 10 ** (-5 / 20) - 1e-3 < float(row.norm() / noise[j[0]].norm()) < 10 ** (5 / 20) + 1e-3
        used += j
    assert sorted(used) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="data.remix.*teacher_cache"):
        training.train(config.load_config(overrides=TINY + ["data.remix=true", "kd.method=similarity_preserving",
                                                            "kd.teacher=x.pt"]), ".", ".")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    cfg = config.load_config(overrides=TINY + ["train.epochs=3"])
    quiet = lambda *_: None
    real = distill.task_loss
    calls = []

    def poisoned(*args, **kwargs):  # NaN at the second training step of epoch 2
        calls.extend([1] if torch.is_grad_enabled() else [])  # validation runs without grad
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == steps_per_epoch + 2 else value

    steps_per_epoch = -(-len(load_corpus(corpus, valid_speakers=1, segment_seconds=None).train) // 2)
    monkeypatch.setattr(distill, "task_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 2: loss is not finite .*task nan"):
        training.train(cfg, corpus, tmp_path, progress=False, log=quiet)
    good = training.load_checkpoint(tmp_path / "last.pt")
    assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in json.loads((tmp_path / "history.json").read_text())] == [1]
    monkeypatch.setattr(distill, "task_loss", real)
    assert training.train(cfg, corpus, tmp_path, progress=False, log=quiet)["history"][-1]["epoch"] == 3


def test_killed_run_resumes_without_losing_finished_epochs(corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = ["train-teacher", "--data", str(corpus), "--no-progress"] + [a for o in TINY for a in ("--set", o)]
    args += ["--set", "train.epochs=4"]
    import pycosdist

    env = {**os.environ, "PYTHONPATH": str(Path(pycosdist.__file__).parents[1])}  # the pycosdist imported here
    proc = subprocess.Popen([sys.executable, "-m", "pycosdist", *args, "--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # during epoch 2 (epoch 1's checkpoint has just been written)
    proc.wait()
    done = training.load_checkpoint(last)["epoch"]
    assert 1 <= done < 4
    from pycosdist.denoise.cli import main

    assert main(args + ["--out", str(tmp_path / "killed")]) == 0
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    a, b = (training.load_checkpoint(tmp_path / d / "last.pt") for d in ("killed", "full"))
    assert a["epoch"] == b["epoch"] == 4
    assert strip_seconds(a["history"])[:done] == strip_seconds(b["history"])[:done]  # finished epochs kept as they were
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_two_step_schedule_trains_kd_alone_then_task_alone(corpus, teacher_ckpt, tmp_path):
    """kd.kd_only_epochs = 1 of 2: epoch 1's loss is the KD term alone (the decoder, which the latent
    does not depend on, stays as initialized), epoch 2's the task alone (the LIB stays as epoch 1 left
    it), and best.pt is never a KD-only epoch."""
    cfg = config.load_config(overrides=TINY + ["train.epochs=2", "kd.method=cosine_lib", f"kd.teacher={teacher_ckpt}",
                                               "kd.kd_only_epochs=1", "train.seed=3"])
    snaps = []
    out = tmp_path / "run"
    init = training.Run(cfg, corpus, tmp_path / "init", progress=False, log=lambda *_: None).train_step
    snaps.append({k: v.clone() for k, v in init.model.state_dict().items()})
    result = training.train(cfg, corpus, out, progress=False, log=lambda *_: None,
                            on_epoch_end=lambda row: snaps.append(torch.load(out / "last.pt", weights_only=False)))
    h = result["history"]
    assert h[0]["train_loss"] == pytest.approx(h[0]["train_kd"]) and h[0]["train_kd"] > 0
    assert h[1]["train_loss"] == pytest.approx(h[1]["train_task"])
    assert not h[0]["best"] and h[1]["best"] and result["best"]["epoch"] == 2
    first, second = snaps[1], snaps[2]
    decoder = [k for k in snaps[0] if k.startswith(("decoder.", "head.")) and "running" not in k and "num_batches" not in k]
    encoder = [k for k in snaps[0] if k.startswith("encoder.") and k.endswith("weight")]
    assert decoder and all(torch.equal(snaps[0][k], first["model"][k]) for k in decoder)  # epoch 1: decoder untouched
    assert any(not torch.equal(snaps[0][k], first["model"][k]) for k in encoder)  # ... the encoder learned
    assert all(torch.equal(first["kd"][k], second["kd"][k]) for k in first["kd"])  # epoch 2: LIB untouched
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in decoder)  # ... the decoder learned


def test_two_step_schedule_needs_kd_and_task_epochs(teacher_ckpt):
    for overrides, expected in ((["kd.kd_only_epochs=1", "train.epochs=3"], "needs a KD method"),
                                (["kd.kd_only_epochs=3", "train.epochs=3", "kd.method=cosine_lib",
                                  f"kd.teacher={teacher_ckpt}"], "fewer KD-only epochs")):
        with pytest.raises(ValueError, match=expected):
            training.check_train_config(config.load_config(overrides=TINY + overrides))


def test_init_starts_from_a_checkpoints_weights_with_a_fresh_optimizer(corpus, tmp_path):
    """model.init = a finished run's best.pt: the new run's model starts as that model (same outputs on a
    clip), its optimizer starts empty and its history at epoch 1; a different architecture is refused."""
    base = config.load_config(overrides=TINY + ["train.epochs=1"])
    training.train(base, corpus, tmp_path / "first", progress=False, log=lambda *_: None)
    start = tmp_path / "first" / "best.pt"
    cfg = config.load_config(overrides=TINY + ["train.epochs=1", f"model.init={start}", "train.seed=5"])
    step = training.Run(cfg, corpus, tmp_path / "init", progress=False, log=lambda *_: None).train_step
    trained = training.load_model(start)[0]
    x = 0.1 * torch.randn(1, 4 * HOP * 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(step.model.eval()(x), trained(x))
    assert step.optimizer.state_dict()["state"] == {}
    second = training.train(cfg, corpus, tmp_path / "second", progress=False, log=lambda *_: None)
    assert [row["epoch"] for row in second["history"]] == [1]
    other = config.load_config(overrides=TINY + [f"model.init={start}", "model.channels=[3, 5]"])
    with pytest.raises(ValueError, match=r"model.init: .* different architecture .*channels"):
        training.check_train_config(other)
    with pytest.raises(ValueError, match=r"model.init: .*no such file"):
        training.check_train_config(config.load_config(overrides=TINY + [f"model.init={tmp_path / 'none.pt'}"]))
    with pytest.raises(ValueError, match=r"model.init: name: expected one of"):
        training.check_train_config(config.load_config(overrides=TINY + ["model.init=pretrained:nobody"]))
