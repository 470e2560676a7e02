"""Training checkpoints: written atomically, loaded with clear errors, device-agnostic (CPU tensors
only), and holding the RNG states that make a resumed run identical to an uninterrupted one.

A checkpoint is a dict: ``format`` ("pycosdist"), ``version``, ``config`` (the training
configuration), ``model_config``, ``model``, ``kd`` (the KD module incl. its LIB, or None),
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``rng``, ``history`` and
``best``. :func:`load_model` needs only ``model_config`` and ``model``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import config as config_mod
from .audio import write_text_atomic
from .models import UNetDenoiser, build_model

CHECKPOINT_VERSION = 1


# --- reproducibility -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def to_cpu(obj):
    """``obj`` (nested dicts / lists / tuples of tensors and plain values) with every tensor on the
    CPU, so a checkpoint written by a GPU run loads anywhere. CPU tensors are returned as they are."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's per-module versions (read by load_state_dict)
            out._metadata = obj._metadata
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# --- files -----------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``: ``path`` is either
    the old complete file or the new complete file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's messages run over several lines of advice: keep the first sentence
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise ValueError(f"checkpoint {path}: not a readable pycosdist checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "pycosdist" or "model_config" not in ckpt:
        raise ValueError(f"checkpoint {path}: not a pycosdist training checkpoint")
    return ckpt


def load_model(path) -> tuple[UNetDenoiser, dict]:
    """The model stored in checkpoint ``path`` (in eval mode) and the checkpoint dict. Raises
    ValueError (one line) when the weights are missing or do not fit the stored model config."""
    ckpt = load_checkpoint(path)
    try:
        model = build_model(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: invalid model_config ({e})") from None
    weights = ckpt.get("model")
    if not isinstance(weights, dict):
        raise ValueError(f"checkpoint {path}: holds no model weights")
    problem = _weights_mismatch(model.state_dict(), weights)
    if problem:
        raise ValueError(f"checkpoint {path}: its weights do not match its model_config ({problem})")
    model.load_state_dict(weights)
    return model.eval(), ckpt


def _weights_mismatch(expected: dict, got: dict) -> str | None:
    """What differs between two state dicts' keys and shapes, in one line (None if nothing)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(getattr(got[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensor shape(s) differ, first {k}: {list(getattr(got[k], 'shape', ()))} in the "
                     f"file, {list(expected[k].shape)} for the config")
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} tensor(s), first {keys[0]}")
    return "; ".join(parts) or None


# --- a run folder ----------------------------------------------------------------------------------
def resume_state(out_dir: Path, cfg: dict) -> dict | None:
    """``out_dir/last.pt`` if there is one (None otherwise), after checking that it was written by a
    run of the same configuration (up to the keys a resume may change)."""
    last = out_dir / "last.pt"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last)
    # Checkpoints are device-agnostic: a run may continue on another device (train.device).
    diff = config_mod.differences(ckpt["config"], cfg, ignore=config_mod.RESUMABLE_KEYS + ("train.device",))
    if diff:
        raise ValueError(f"{out_dir} holds a run with a different configuration ({'; '.join(diff)}); "
                         f"use another output directory, or the original configuration to resume it")
    return ckpt


def write_history(out_dir: Path, history: list[dict]) -> None:
    """``history.json`` and ``history.csv`` (one row per epoch), each written atomically."""
    write_text_atomic(out_dir / "history.json", json.dumps(history, indent=1))
    if history:
        keys = list(dict.fromkeys(k for row in history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys, lineterminator="\n")
        w.writeheader()
        w.writerows(history)
        write_text_atomic(out_dir / "history.csv", buf.getvalue())
