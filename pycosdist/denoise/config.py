"""Training configuration: TOML files over typed defaults, plus ``key=value`` overrides.

A configuration is a two-level dict ``{section: {key: value}}``; :data:`DEFAULTS` lists every key
and fixes its type. Files and overrides may only set known keys (an unknown key is an error that
lists the valid ones), and each value is converted to / checked against its default's type and then
against its valid range (:data:`CHECKS`), so a value that cannot work fails when the configuration
is loaded, naming the key, the value and the valid range, before any data or model is touched.
Overrides use dotted keys: ``train.lr=1e-3``, ``model.channels=[8, 16, 32]``, ``kd.teacher_cache=false``.
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Callable

DEFAULTS: dict[str, dict] = {
    "model": {
        "preset": "teacher",  # a pycosdist.models.PRESETS name
        "channels": [],  # per-level channels; [] = the preset's
        "kernel_size": [],  # [freq, time]; [] = the preset's
        "bottleneck_layers": 0,  # 0 = the preset's
        "norm": "",  # "batch" | "group"; "" = the preset's (batch). "group" for exact CPU DDP (see models)
        "mask_floor": 0.0,  # lowest mask value (gain floor, 0.1 = -20 dB); 0 = the preset's (none)
        # weights the training starts from (fine-tuning): a checkpoint of this very architecture, or
        # "pretrained:NAME" for a shipped model (pycosdist.denoise.pretrained); "" = random initialization.
        # The optimizer and the lr schedule start fresh; a resumed run continues from last.pt as usual.
        "init": "",
    },
    "data": {
        "segment_seconds": 2.0,  # training crop (rounded to a multiple of the 128-sample hop)
        "valid_speakers": 2,  # training speakers held out for validation
        "remix": False,  # dynamic remixing augmentation (training.remix); not with kd.teacher_cache
    },
    "train": {
        "epochs": 10,
        "batch_size": 8,
        "lr": 2e-3,
        "weight_decay": 0.0,
        "warmup_steps": 20,  # linear warm-up, then cosine decay to min_lr_ratio * lr at the last step
        "min_lr_ratio": 0.05,
        "grad_clip": 5.0,  # max global gradient norm (0 = off)
        "seed": 0,
        "threads": 0,  # torch intra-op threads; 0 = one per CPU core
        "valid_metric": "loss",  # selects best.pt: "loss" (valid task loss, lower is better) or "pesq"
        "eval_workers": 2,  # processes scoring PESQ/STOI when valid_metric = "pesq"
        "device": "auto",  # "auto" (CUDA if available, else CPU) | "cpu" | "cuda" | "cuda:N"; torchrun: cuda:LOCAL_RANK
        "amp": "none",  # mixed precision: "none" | "bf16" (CPU or CUDA) | "fp16" (CUDA only, with a GradScaler)
        # the whole step captured in one CUDA graph (graphed_step): CUDA, amp none/bf16, one process.
        # Off by default until verified on a GPU (make gpu-check); the losses are the eager step's.
        "cuda_graphs": False,
    },
    "loss": {
        "wave_weight": 10.0,  # task loss = L1(|Y|^0.3, |S|^0.3) + wave_weight * L1(y, s)
        "sisdr_weight": 0.0,  # ... + sisdr_weight * (-SI-SDR(y, s) in dB)
    },
    "kd": {
        "method": "none",  # none | fitnet_mse | similarity_preserving | cosine_lib
        "teacher": "",  # teacher checkpoint (required unless method = "none")
        "lambda": 1.0,  # total loss = task + lambda * KD
        "expansion": 4,  # LIB expansion factor (cosine_lib)
        "bias": True,  # LIB biases (cosine_lib)
        "eps": 1e-8,
        "teacher_cache": True,  # compute each training utterance's teacher latent once and reuse it
        # Two-step schedule (Nathoo et al., ICASSP 2024): the first kd_only_epochs epochs train on the KD
        # loss ALONE, the rest on the task loss alone. 0 = one step: task + lambda * KD every epoch.
        "kd_only_epochs": 0,
    },
}


# --- value checks: key -> (predicate on the typed value, what a valid value is) -----------------------
Check = tuple[Callable[[object], bool], str]  # (is the typed value valid?, what a valid value is)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low) -> Check:
    return (lambda v: _finite(v) and v >= low), f">= {low}"


def above(low) -> Check:
    return (lambda v: _finite(v) and v > low), f"> {low}"


def between(low, high) -> Check:
    return (lambda v: _finite(v) and low <= v <= high), f"in [{low}, {high}]"


def one_of(*choices) -> Check:
    return (lambda v: v in choices), f"one of {list(choices)}"


def int_list(lengths: tuple = (), empty_means: str = "the preset's") -> Check:
    """[] or a list of positive integers (of one of ``lengths`` items when given)."""
    def ok(v):
        return v == [] or (all(type(x) is int and x > 0 for x in v) and (not lengths or len(v) in lengths))
    size = f"{' or '.join(map(str, lengths))} " if lengths else ""
    return ok, f"[] ({empty_means}) or a list of {size}positive integers"


CHECKS: dict[str, Check] = {
    "model.channels": int_list(),
    "model.kernel_size": int_list((2,)),
    "model.bottleneck_layers": at_least(0),
    "model.norm": one_of("", "batch", "group"),
    "model.mask_floor": ((lambda v: _finite(v) and 0 <= v < 1), "in [0, 1)"),
    "data.segment_seconds": above(0),
    "data.valid_speakers": at_least(1),
    "train.epochs": at_least(1),
    "train.batch_size": at_least(1),
    "train.lr": above(0),
    "train.weight_decay": at_least(0),
    "train.warmup_steps": at_least(0),
    "train.min_lr_ratio": between(0, 1),
    "train.grad_clip": at_least(0),
    "train.seed": at_least(0),
    "train.threads": at_least(0),
    "train.valid_metric": one_of("loss", "pesq"),
    "train.eval_workers": at_least(0),
    "train.amp": one_of("none", "bf16", "fp16"),
    "train.device": ((lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())),
                     "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "loss.wave_weight": at_least(0),
    "loss.sisdr_weight": at_least(0),
    "kd.lambda": at_least(0),
    "kd.expansion": at_least(1),
    "kd.eps": at_least(0),
    "kd.kd_only_epochs": at_least(0),
}


def check_value(key: str, value) -> None:
    """Raises ValueError naming ``key``, ``value`` and the valid range when :data:`CHECKS` rejects it."""
    rule = CHECKS.get(key)
    if rule is not None and not rule[0](value):
        kind = {int: "an integer ", float: "a finite number "}.get(type(value), "")
        raise ValueError(f"{key}: expected {kind}{rule[1]}, got {value!r}")


# Keys that may change when a run is resumed (they do not change what is being trained).
RESUMABLE_KEYS = ("train.epochs", "train.threads", "train.eval_workers", "train.cuda_graphs")


def valid_keys() -> list[str]:
    return [f"{s}.{k}" for s, keys in DEFAULTS.items() for k in keys]


def _unknown(key: str) -> KeyError:
    return KeyError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")


def _split(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in DEFAULTS or name not in DEFAULTS[section]:
        raise _unknown(key)
    return section, name


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{key}: expected a boolean (true/false), got {text!r}")


def coerce(key: str, value):
    """``value`` (a string from the command line, or a TOML value) as the type of ``key``'s default,
    checked against :data:`CHECKS`."""
    section, name = _split(key)
    default = DEFAULTS[section][name]
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value
        try:
            if kind is bool:
                value = _parse_bool(text, key)
            elif kind is list:
                value = tomllib.loads(f"v = {text}")["v"]
            else:
                value = kind(text)
        except ValueError as e:
            raise ValueError(f"{key}: expected a {kind.__name__}, got {text!r} ({e})") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ValueError(f"{key}: expected a {kind.__name__} (default {default!r}), got {value!r}")
    check_value(key, value)
    return copy.deepcopy(value)


def merge(cfg: dict, updates: dict) -> dict:
    """``cfg`` with the two-level ``updates`` applied (checked and typed); a new dict."""
    out = copy.deepcopy(cfg)
    for section, keys in updates.items():
        if not isinstance(keys, dict):
            raise _unknown(section)
        for name, value in keys.items():
            key = f"{section}.{name}"
            _split(key)
            out[section][name] = coerce(key, value)
    return out


def set_value(cfg: dict, assignment: str) -> dict:
    """Applies one ``section.key=value`` override; returns a new dict."""
    key, sep, value = assignment.partition("=")
    if not sep:
        raise ValueError(f"override {assignment!r}: expected the form section.key=value")
    section, name = _split(key.strip())
    return merge(cfg, {section: {name: value.strip()}})


def load_config(path=None, overrides=(), base: dict | None = None) -> dict:
    """:data:`DEFAULTS` (or ``base``), then the TOML file ``path`` if given, then each ``overrides``
    entry (``section.key=value``) in order."""
    cfg = copy.deepcopy(base if base is not None else DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file {path}")
        with open(path, "rb") as f:
            try:
                cfg = merge(cfg, tomllib.load(f))
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config {path}: not valid TOML ({e})") from None
    for assignment in overrides:
        cfg = set_value(cfg, assignment)
    return cfg


def check(cfg: dict) -> dict:
    """Validates a full configuration (every key known, typed and in range); returns a copy."""
    missing = [k for k in valid_keys() if k.partition(".")[2] not in cfg.get(k.partition(".")[0], {})]
    if missing:
        raise ValueError(f"config: missing keys {missing}")
    return merge(DEFAULTS, cfg)


def differences(a: dict, b: dict, ignore=()) -> list[str]:
    """``key: a -> b`` for every key whose value differs (keys in ``ignore`` skipped)."""
    def get(cfg, s, n):  # a key added after a run was written has its default there
        return cfg.get(s, {}).get(n, DEFAULTS[s][n])

    return [f"{k}: {get(a, s, n)!r} -> {get(b, s, n)!r}" for k in valid_keys() if k not in ignore
            for s, n in [k.split(".", 1)] if get(a, s, n) != get(b, s, n)]


def to_toml(cfg: dict) -> str:
    """TOML text of ``cfg`` (the value types used here only: str, bool, int, float, list)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    return "\n".join(f"[{s}]\n" + "".join(f"{k} = {fmt(v)}\n" for k, v in keys.items()) for s, keys in cfg.items())
