"""Helpers shared by the training tests: a tiny corpus and teacher, stopping a run after an epoch,
comparing histories."""

import pytest

from pycosdist.denoise import config, training
from pycosdist.denoise.synth import synthesize_corpus

# A model and crops small enough for a training test to take seconds.
TINY = ["model.channels=[4, 8]", "model.kernel_size=[3, 3]", "model.bottleneck_layers=1",
        "data.segment_seconds=0.5", "data.valid_speakers=1", "train.batch_size=2", "train.threads=1",
        "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthesize_corpus(tmp_path_factory.mktemp("corpus"), n_train_speakers=3, n_test_speakers=1,
                             utts_per_speaker=3, test_utts_per_speaker=2, seed=0)


@pytest.fixture(scope="module")
def teacher_ckpt(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = config.load_config(overrides=TINY + ["train.epochs=1", "model.channels=[6, 8]"])
    training.train(cfg, corpus, out, progress=False, log=lambda *_: None)
    return out / "best.pt"


class Interrupt(Exception):
    """Raised by :func:`stop_after`'s hook, as a crash after an epoch's checkpoint would."""


def stop_after(n: int):
    """An ``on_epoch_end`` hook that interrupts training after epoch ``n``."""
    def hook(row):
        if row["epoch"] == n:
            raise Interrupt

    return hook


def strip_seconds(history: list[dict]) -> list[dict]:
    """A history without its wall-clock column (the only one that differs between equal runs)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]
