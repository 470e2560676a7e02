"""Two CPU processes under torchrun (gloo) train in lock-step with one process on the combined batch."""

import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch

import pycosdist
from pycosdist.denoise import training
from pycosdist.denoise.cli import main
from pycosdist.denoise.synth import synthesize_corpus

# norm=group: per-example normalization, so the split run is exactly the combined-batch run (BatchNorm
# statistics would be per rank: SyncBatchNorm needs a GPU).
ARGS = ["--set", "model.channels=[4, 8]", "--set", "model.kernel_size=[3, 3]", "--set", "model.bottleneck_layers=1",
        "--set", "model.norm=group", "--set", "data.segment_seconds=0.5", "--set", "data.valid_speakers=1",
        "--set", "train.batch_size=4", "--set", "train.epochs=2", "--set", "train.threads=1",
        "--set", "train.warmup_steps=1", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")  # 15 training files: global batches 4, 4, 4, 3 (shares 2 + 1 at the end)
    corpus = synthesize_corpus(d / "corpus", n_train_speakers=4, n_test_speakers=1, utts_per_speaker=5,
                               test_utts_per_speaker=1, seed=3)
    assert main(["train-teacher", "--data", str(corpus), "--out", str(d / "teacher"), *ARGS,
                 "--set", "model.channels=[6, 8]", "--set", "train.epochs=1"]) == 0
    return d, corpus


def test_two_gloo_ranks_match_one_process_with_the_combined_batch(setup):
    d, corpus = setup
    distill = ["distill", "--method", "cosine_lib", "--teacher", str(d / "teacher" / "best.pt"),
               "--data", str(corpus), *ARGS]
    assert main(distill + ["--out", str(d / "single")]) == 0
    # The pycosdist this test imported (installed or in-place), whatever the child's cwd.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(pycosdist.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "pycosdist", *distill, "--out", str(d / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=d)  # cwd: not the source tree
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("epoch 2/2") == 1  # rank 0 alone logs

    single = training.load_checkpoint(d / "single" / "last.pt")
    ddp = training.load_checkpoint(d / "ddp" / "last.pt")
    assert single["epoch"] == ddp["epoch"] == 2
    for part in ("model", "kd"):  # the student AND the LIB of the KD loss
        assert single[part].keys() == ddp[part].keys()
        for k in single[part]:
            # The folded LIB gradients (dW1 = W2^T dW, ...) round differently when each rank sums half
            # the rows; AdamW turns that rounding of near-zero gradient entries into differences of a few
            # 1e-5 after 8 steps (a sharding or share-weighting error gives the size of a step, ~1e-3).
            atol = 1e-4 if part == "kd" else 2e-5
            torch.testing.assert_close(ddp[part][k], single[part][k], atol=atol, rtol=1e-4, msg=f"{part}.{k}")
    for a, b in zip(single["history"], ddp["history"]):  # logged losses are global means
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["valid_loss"] - b["valid_loss"]) < 1e-5


def test_batch_must_split_evenly_over_ranks(setup, monkeypatch):
    d, corpus = setup
    monkeypatch.setattr(training, "init_distributed", lambda backend="gloo": (0, 3))
    with pytest.raises(ValueError, match=r"train.batch_size: the global batch \(4\) must be divisible by the number "
                                         r"of processes \(3\)"):
        training.train(training.config_mod.load_config(overrides=["train.batch_size=4"]), corpus, d / "bad")


def test_the_process_group_backend_follows_the_device(setup, monkeypatch):
    """Run joins the group with dist_backend(train.device): gloo here (NCCL only on CUDA, see test_device)."""
    d, corpus = setup
    backends = []
    monkeypatch.setattr(training, "init_distributed", lambda backend="gloo": backends.append(backend) or (0, 1))
    cfg = training.config_mod.load_config(overrides=[o for o in ARGS[1::2] if "=" in o] + ["train.epochs=1"])
    result = training.train(cfg, corpus, d / "backend", progress=False, log=lambda *_: None)
    assert backends == ["gloo"] and result["device"] == "cpu"
