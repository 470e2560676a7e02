"""Recorded noise from installable Debian packages: a catalog, a split by recording, a noise bank.

Generated noise (:mod:`pycosdist.denoise.generated_noise`) is not what users denoise: real rooms,
streets and machines are non-stationary, and a model tuned on white noise can lose intelligibility
on fire crackle or insects (issue 25). The packages below ship hours of recorded sound under free
licenses; each :class:`NoiseSource` names its package, where the files lie (plain folders, or
members of a zip archive such as 0 A.D.'s ``public.zip``), a noise *family* and the license as the
package's Debian copyright file states it (also written to every manifest).

Splits are by *recording*, never by excerpt: :func:`split_of` puts each whole file in exactly one of
train / valid / test, from a hash of its package and path (no file moves when others are added).
Sources with ``role="eval"`` (the Battle for Wesnoth ambiences: fire, waves and creaking, insects at
night, birds) never enter training at all: they form the held-out *recorded* evaluation set of
:mod:`pycosdist.denoise.realspeech`, so the reported gain is on noise the models never heard.

A :class:`NoiseBank` holds the decoded recordings of one split (16 kHz mono float32) and draws
noise of any length: a random excerpt of a long recording, or, for short sound events (a door, a
click, a shot), a sequence of events at random times over a faint floor, as they occur in life.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, AudioError, to_mono_16k

SPLITS = ("train", "valid", "test")
MIN_SECONDS = 0.1  # shorter files (UI blips) carry too little sound to be noise
MAX_SECONDS = 120.0  # longer files (music tracks) are cut: 2 minutes of each is variety enough
QUIET_DB = -60.0  # an excerpt whose RMS is this far below the recording's is silence, not noise


@dataclass(frozen=True)
class NoiseSource:
    """A set of recordings in one Debian package.

    ``base``: folder under the file-system root (or, with ``archive``, the folder holding the zip
    archive); ``patterns``: globs of files under ``base`` (or of archive members); ``family``: what
    it sounds like (reported per family); ``role``: "train" (split 85/15 into train/valid by
    recording) or "eval" (never trained on; split between valid and test, see ``eval_valid``).
    """

    package: str
    base: str
    patterns: tuple[str, ...]
    family: str
    license: str
    role: str = "train"
    archive: str | None = None
    exclude: tuple[str, ...] = ()
    eval_valid: tuple[str, ...] = field(default=())  # eval sources: file stems that go to valid (rest: test)


_0AD = "usr/share/games/0ad/mods/public"
_FG = "usr/share/games/flightgear"
_STK = "usr/share/games/supertuxkart/data"
_HW = "usr/share/games/hedgewars/Data"
_WZ = "usr/share/games/warzone2100"
_WN = "usr/share/games/wesnoth/1.16"
_0AD_LICENSE = "0ad-data: CC-BY-SA-3.0 (art and sound; see /usr/share/doc/0ad-data/copyright)"

SOURCES: tuple[NoiseSource, ...] = (
    # Weather and nature ambiences (long, non-stationary).
    NoiseSource("0ad-data", _0AD, ("audio/ambient/weather/*.ogg",), "weather", _0AD_LICENSE, archive="public.zip"),
    NoiseSource("0ad-data", _0AD, ("audio/ambient/dayscape/*.ogg", "audio/ambient/water/*.ogg"), "nature",
                _0AD_LICENSE, archive="public.zip"),
    NoiseSource("0ad-data", _0AD, ("audio/actor/fauna/*/*.ogg",), "animals", _0AD_LICENSE, archive="public.zip"),
    # Machines, work, crowds of a settlement, vehicles.
    NoiseSource("0ad-data", _0AD, ("audio/ambient/building/*.ogg", "audio/resource/*/*.ogg"), "work",
                _0AD_LICENSE, archive="public.zip"),
    NoiseSource("flightgear-data-base", _FG, ("Sounds/*.wav", "Aircraft/c172p/Sounds/*.wav"), "engines",
                "flightgear-data-base: GPL-2+", exclude=("*tcas*", "*mk-viii*", "*atc*")),
    NoiseSource("supertuxkart-data", _STK, ("sfx/*.ogg",), "engines",
                "supertuxkart-data: CC-BY-SA-3.0 / CC-BY-SA-4.0 / CC0 / CC-BY-3.0 per file (Debian copyright)"),
    NoiseSource("lincity-ng-data", "usr/share/games/lincity-ng", ("sounds/*.wav", "sounds/*.ogg"), "work",
                "lincity-ng-data: GPL-2+"),
    # Impacts, clicks, alarms: short events.
    NoiseSource("0ad-data", _0AD, ("audio/attack/*/*.ogg", "audio/actor/singlesteps/*.ogg",
                                   "audio/actor/human/movement/*/*.ogg", "audio/interface/alarm/*.ogg"),
                "impacts", _0AD_LICENSE, archive="public.zip"),
    NoiseSource("warzone2100-data", _WZ, ("audio/sfx/*/*.ogg",), "impacts", "warzone2100-data: GPL-2+",
                archive="base.wz"),
    NoiseSource("hedgewars-data", _HW, ("Sounds/*.ogg",), "impacts", "hedgewars-data: GPL-2 (sounds)"),
    NoiseSource("freeciv-data", "usr/share/games/freeciv", ("stdsounds/*.ogg",), "impacts", "freeciv-data: GPL-2+"),
    NoiseSource("sound-theme-freedesktop", "usr/share/sounds/freedesktop", ("stereo/*.oga",), "impacts",
                "sound-theme-freedesktop: GPL-2+ / CC-BY-SA-3.0 / CC-BY-3.0 per file"),
    # Music.
    NoiseSource("0ad-data", _0AD, ("audio/music/*.ogg",), "music", _0AD_LICENSE, archive="public.zip"),
    NoiseSource("hedgewars-data", _HW, ("Music/*.ogg",), "music", "hedgewars-data: GPL-2 / CC-BY-SA (music)"),
    NoiseSource("supertuxkart-data", _STK, ("music/*.ogg",), "music", "supertuxkart-data: CC-BY-SA / CC0 per file"),
    NoiseSource("frozen-bubble-data", "usr/share/games/frozen-bubble", ("snd/*.ogg", "snd/*.wav"), "music",
                "frozen-bubble-data: GPL-2"),
    # Held out: never trained on (the recorded non-stationary evaluation set).
    NoiseSource("wesnoth-1.16-data", _WN, ("data/core/sounds/ambient/*.ogg",), "ambience",
                "wesnoth-1.16-data: GPL-2+", role="eval", eval_valid=("birds1", "birds2", "birds3", "wardrums")),
)
FAMILIES = tuple(dict.fromkeys(s.family for s in SOURCES))
TRAIN_FAMILIES = tuple(dict.fromkeys(s.family for s in SOURCES if s.role == "train"))
EVAL_PACKAGES = tuple(dict.fromkeys(s.package for s in SOURCES if s.role == "eval"))


@dataclass(frozen=True)
class Recording:
    """One recording: where it is (``path``; ``member`` inside an archive) and what it is."""

    package: str
    path: str
    member: str | None
    family: str
    license: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.package}:{self.member or self.path}"


def split_of(source: NoiseSource, relpath: str, seed: int = 0) -> str:
    """The split of one recording: eval sources go to valid (stems in ``eval_valid``) or test;
    training sources to valid for 15% of recordings (by a hash of package, path and seed), else train."""
    if source.role == "eval":
        return "valid" if Path(relpath).stem in source.eval_valid else "test"
    digest = hashlib.sha256(f"{seed}:{source.package}:{relpath}".encode()).digest()
    return "valid" if int.from_bytes(digest[:4], "little") % 100 < 15 else "train"


def _glob(relpath: str, pattern: str) -> bool:
    """Shell-style match segment by segment: ``*`` never crosses a ``/`` (``Sounds/*.ogg`` is not
    ``Sounds/voices/x.ogg``, which fnmatch alone would accept)."""
    parts, pats = relpath.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatch(a, p) for a, p in zip(parts, pats))


def _matches(relpath: str, source: NoiseSource) -> bool:
    return (any(_glob(relpath, p) for p in source.patterns)
            and not any(fnmatch.fnmatch(relpath, p) for p in source.exclude))


def _source_files(source: NoiseSource, root: Path) -> list[tuple[str, str | None]]:
    """[(path, archive member or None)] of ``source`` under ``root``, sorted."""
    base = root / source.base
    if source.archive:
        archive = base / source.archive
        if not archive.is_file():
            return []
        with zipfile.ZipFile(archive) as z:
            return [(str(archive), m) for m in sorted(z.namelist()) if _matches(m, source)]
    if not base.is_dir():
        return []
    return [(str(f), None) for f in sorted(base.rglob("*")) if f.is_file() and _matches(str(f.relative_to(base)), source)]


def find_recordings(roots=("/",), sources=None, seed: int = 0) -> list[Recording]:
    """Every recording of ``sources`` found under any of ``roots`` (folders that mirror ``/``, e.g.
    ``/`` itself, or a package unpacked with ``dpkg-deb -x``), with its split."""
    found: dict[tuple, Recording] = {}
    for source in SOURCES if sources is None else sources:
        for root in roots:
            for path, member in _source_files(source, Path(root)):
                rel = member or str(Path(path).relative_to(Path(root) / source.base))
                rec = Recording(source.package, path, member, source.family, source.license,
                                split_of(source, rel, seed))
                found.setdefault((source.package, source.base, rel), rec)  # once, whichever root holds it
    return list(found.values())


def missing_packages(recordings: list[Recording], sources=None, role: str | None = None) -> list[str]:
    """Packages of ``sources`` (of ``role``, if given) with no recording among ``recordings``."""
    have = {r.package for r in recordings}
    return sorted({s.package for s in (SOURCES if sources is None else sources)
                   if role is None or s.role == role} - have)


def decode(rec: Recording) -> np.ndarray:
    """16 kHz mono float32 of ``rec``, at most its first :data:`MAX_SECONDS` (only those are decoded);
    raises AudioError when unreadable."""
    import soundfile as sf

    try:
        if rec.member is None:
            source = rec.path
        else:
            with zipfile.ZipFile(rec.path) as z:
                source = io.BytesIO(z.read(rec.member))
        with sf.SoundFile(source) as f:
            frames = min(f.frames, int(MAX_SECONDS * f.samplerate)) if f.frames > 0 else -1
            audio, sr = f.read(frames, dtype="float32", always_2d=True), f.samplerate
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError... for bad files
        raise AudioError(rec.name, f"unreadable audio ({type(e).__name__}: {e})") from e
    if audio.size == 0 or not np.isfinite(audio).all():
        raise AudioError(rec.name, "empty or non-finite audio")
    return to_mono_16k(audio.T, sr).astype(np.float32)  # (channels, samples) -> (samples,)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


class NoiseBank:
    """Decoded recordings of one split, by family; draws unit-RMS noise of any length.

    ``recordings``: ``{family: [(name, audio (samples,) float32 16 kHz)]}``. Build it with
    :func:`load_bank`; unreadable, silent or too short files are left out (and listed in ``skipped``).
    """

    def __init__(self, recordings: dict[str, list[tuple[str, np.ndarray]]], skipped: dict[str, str] | None = None):
        self.recordings = {f: r for f, r in recordings.items() if r}
        self.skipped = dict(skipped or {})
        if not self.recordings:
            raise ValueError("recordings: the noise bank is empty (no readable recording in any family)")
        self.families = tuple(sorted(self.recordings))

    def __len__(self) -> int:
        return sum(len(r) for r in self.recordings.values())

    def seconds(self) -> dict[str, float]:
        return {f: round(sum(len(x) for _, x in r) / SAMPLE_RATE, 1) for f, r in self.recordings.items()}

    def sample(self, n: int, rng: np.random.Generator, family: str | None = None) -> tuple[np.ndarray, str]:
        """``(noise (n,) float64 with unit RMS, name of the recording it starts from)``. A family is
        drawn uniformly when ``family`` is None (every family equally often, whatever its size)."""
        if family is None:
            family = self.families[rng.integers(len(self.families))]
        elif family not in self.recordings:
            raise ValueError(f"family: expected one of {self.families}, got {family!r}")
        pool = self.recordings[family]
        return self.draw(family, int(rng.integers(len(pool))), n, rng)

    def draw(self, family: str, index: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """Like :meth:`sample`, from recording ``index`` of ``family`` (e.g. to cycle through a
        small evaluation set so that every recording is used equally often)."""
        pool = self.recordings[family]
        name, x = pool[index % len(pool)]
        for _ in range(8):  # a long file's excerpt can fall in a pause: draw again
            noise = _excerpt(x, n, rng) if len(x) >= n else _events(pool, x, n, rng)
            if _rms(noise) > _rms(x) * 10 ** (QUIET_DB / 20) and _rms(noise) > 1e-6:
                break
        return noise / (_rms(noise) + 1e-12), name


def _excerpt(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    start = int(rng.integers(0, len(x) - n + 1))
    return x[start:start + n].astype(np.float64)


def _events(pool, first: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Short recordings of ``pool`` (``first`` among them) placed at random times over ``n`` samples,
    on a faint floor of the first one's level: 0.5-4 events per second, random gains."""
    out = rng.standard_normal(n) * _rms(first) * 10 ** (rng.uniform(-40, -25) / 20)
    count = max(1, int(round(n / SAMPLE_RATE * rng.uniform(0.5, 4))))
    for k in range(count):
        ev = first if k == 0 else pool[rng.integers(len(pool))][1]
        ev = ev[:n]
        start = int(rng.integers(0, n - len(ev) + 1))
        out[start:start + len(ev)] += ev * 10 ** (rng.uniform(-10, 0) / 20)
    return out


def load_bank(recordings: list[Recording], split: str, cache_dir=None) -> NoiseBank:
    """The :class:`NoiseBank` of ``split``'s recordings. With ``cache_dir``, the decoded audio is
    kept there as one ``.npz`` per split (decoding a few thousand OGG files takes minutes); the
    cache is used only when it lists exactly the same recordings."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    recs = sorted((r for r in recordings if r.split == split), key=lambda r: r.name)
    names = [r.name for r in recs]
    cache = Path(cache_dir) / f"noise_bank_{split}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta["names"] == names:
                bank: dict[str, list] = {}
                for i, (name, family) in enumerate(meta["kept"]):
                    bank.setdefault(family, []).append((name, z[f"a{i}"]))
                return NoiseBank(bank, meta["skipped"])
    bank, skipped = {}, {}
    for rec in recs:
        try:
            x = decode(rec)
        except AudioError as e:
            skipped[rec.name] = str(e)
            continue
        if len(x) < MIN_SECONDS * SAMPLE_RATE or _rms(x) < 1e-5:
            skipped[rec.name] = "too short or silent"
            continue
        bank.setdefault(rec.family, []).append((rec.name, x))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        kept = [(name, family, x) for family, recs_of in bank.items() for name, x in recs_of]
        arrays = {f"a{i}": x for i, (_, _, x) in enumerate(kept)}
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, meta=json.dumps(dict(names=names, kept=[(n, f) for n, f, _ in kept], skipped=skipped)), **arrays)
        tmp.replace(cache)
    return NoiseBank(bank, skipped)


def manifest(recordings: list[Recording]) -> dict:
    """A JSON-able description of ``recordings``: per package its license and files per split and
    family (written beside every corpus built from them)."""
    out: dict[str, dict] = {}
    for r in recordings:
        p = out.setdefault(r.package, dict(license=r.license, files={}))
        key = f"{r.split}/{r.family}"
        p["files"][key] = p["files"].get(key, 0) + 1
    return dict(packages=out, sources=[asdict(s) for s in SOURCES if s.package in out])
