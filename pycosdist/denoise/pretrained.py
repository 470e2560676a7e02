"""Pretrained models shipped inside the package, so that a user can denoise and distill without
training anything first.

- ``teacher``: the demo teacher's architecture (362k parameters) trained on recorded noise in two
  stages (``configs/teacher_realnoise.toml``, then ``configs/teacher_realnoise_stage2.toml``; corpus
  ``scripts/build_teacher_corpus.sh``); ``pycosdist demo`` distills from it unless
  ``--train-teacher`` is given.
- ``student``: the best demo student (23k parameters), distilled from that teacher; the default
  model of ``pycosdist enhance``.

The files in ``weights/`` are inference-only checkpoints (:func:`slim_checkpoint`): weights,
configuration and training history, no optimizer state and no LIB (the LIB only serves training).
``weights/README.md`` says how each was made and what it scored.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")
MODELS = {"teacher": "teacher_realnoise.pt", "student": "student_realnoise.pt"}
# What an inference-only checkpoint keeps of a training checkpoint.
KEPT_KEYS = ("format", "version", "config", "model_config", "model", "epoch", "history", "best")


def path(name: str) -> Path:
    """The file of shipped model ``name`` (one of :data:`MODELS`). FileNotFoundError when this copy of
    the package was built without it."""
    if name not in MODELS:
        raise ValueError(f"name: expected one of {sorted(MODELS)}, got {name!r}")
    file = WEIGHTS_DIR / MODELS[name]
    if not file.is_file():
        raise FileNotFoundError(f"pretrained {name!r}: {file} is not in this installation of pycosdist")
    return file


PREFIX = "pretrained:"


def resolve(spec) -> Path:
    """The checkpoint file ``spec`` names: ``"pretrained:NAME"`` is shipped model NAME (:func:`path`),
    anything else a path. The one spelling that ``model.init`` and every ``--checkpoint`` /
    ``--teacher`` of the command line accept."""
    spec = str(spec)
    return path(spec.removeprefix(PREFIX)) if spec.startswith(PREFIX) else Path(spec)


def available() -> list[str]:
    """The shipped models present in this installation."""
    return [name for name, file in MODELS.items() if (WEIGHTS_DIR / file).is_file()]


def slim_checkpoint(src, dst) -> Path:
    """Writes the inference-only form of training checkpoint ``src`` to ``dst`` (atomically) and returns
    ``dst``; it loads with :func:`pycosdist.denoise.training.load_model` like the original."""
    from .checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)  # ValueError naming src when it is not a pycosdist checkpoint
    return save_checkpoint({k: ckpt[k] for k in KEPT_KEYS if k in ckpt}, dst)
