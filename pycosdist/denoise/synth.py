"""Offline synthetic noisy-speech corpus in the VoiceBank+DEMAND layout (16 kHz).

Speech comes from espeak-ng (the ``espeakng-loader`` wheel ships the library and its data; we
drive it through ctypes). A speaker is a distinct (voice, variant, rate, pitch) combination, an
utterance a sentence drawn from word lists. Noises: white, pink, brown, babble (other speakers'
speech), mains hum with harmonics, and non-stationary bursts, mixed at the VoiceBank+DEMAND SNRs.
Everything follows from ``seed``: the same seed writes identical files.

To generalize to real voices (issue 10) the default corpus has many short-lived speakers (voices
x variants, the Klatt-based "human" variants included), augments the training speech
(:mod:`pycosdist.denoise.augment`: speed, EQ, small rooms), adds generated non-stationary and
structured noises (speech-shaped, traffic-like rumble, music-like tones, clicks) and trains down
to -5 dB SNR. The test split is never augmented.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, to_mono_16k, write_audio, write_text_atomic
from .augment import augment_speech
from .data import SPLIT_DIRS, SUFFIX_16K
from .generated_noise import NOISE_TYPES, make_noise, mix_at_snr

TRAIN_SNRS = (-5.0, 0.0, 5.0, 10.0, 15.0)
TEST_SNRS = (2.5, 7.5, 12.5, 17.5)
VOICES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
# espeak-ng voice variants that sound like people (the Klatt-based ones add breath and other glottal
# sources); robotic, whispered and effect variants are left out.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
            "klatt4", "Andy", "Annie", "adam", "aunty", "belinda", "benjamin", "caleb", "david", "edward", "grandma",
            "grandpa", "iven", "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "robert",
            "steph", "travis", "victor", "zac")
MANIFEST = "manifest.json"


class _Espeak:
    """Process-wide espeak-ng in synchronous mode (the library has global state, hence a lock)."""

    _instance: "_Espeak | None" = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> "_Espeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        import espeakng_loader

        self.data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = lib.espeak_Initialize(2, 0, self.data_path.encode(), 0)  # 2 = synchronous
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data at {self.data_path}")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # kept alive: the library holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wav, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue

    def synth(self, text: str, voice: str, variant: str, rate: int, pitch: int, rand_seed: int) -> np.ndarray:
        """float32 (samples,) at :attr:`sample_rate`. ``rand_seed`` fixes espeak's internal noise
        source, which otherwise makes repeated syntheses differ."""
        with self._lock:
            if self.lib.espeak_SetVoiceByName(f"{voice}+{variant}".encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice}+{variant}")
            self.lib.espeak_SetParameter(1, int(rate), 0)  # espeakRATE, words per minute
            self.lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH, 0..100
            self.lib.espeak_ng_SetRandSeed(int(rand_seed))
            self._chunks = []
            b = text.encode()
            err = self.lib.espeak_Synth(b, len(b) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, UTF-8
            self.lib.espeak_Synchronize()
            if err != 0 or not self._chunks:
                raise RuntimeError(f"espeak-ng produced no audio for {text!r} (error {err})")
            return np.concatenate(self._chunks).astype(np.float32) / 32768.0


# --- sentences -------------------------------------------------------------------------------
_W = {
    "name": "Anna Ben Clara David Emma Frank Grace Henry Iris Jack Laura Martin Nina Oscar Paula Sam Tara Victor".split(),
    "adj": "old quiet bright small heavy green careful sudden warm empty narrow golden busy gentle broken cold "
           "famous tired clever distant".split(),
    "noun": "garden window letter kitchen river engine basket doctor teacher market bridge station picture "
            "village ladder candle blanket bicycle mountain harbour".split(),
    "verb_past": "opened found painted carried noticed repaired visited cleaned followed watched described "
                 "borrowed crossed ordered returned".split(),
    "verb": "open find paint carry check repair visit clean follow watch describe borrow cross order bring".split(),
    "prep": "near behind under beside across inside above".split(),
    "place": "library school office museum hospital bakery airport theatre park hotel".split(),
    "time": ["this morning", "yesterday evening", "last week", "after lunch", "before sunrise", "on Monday", "tonight"],
    "adv": "slowly quickly carefully quietly happily early".split(),
    "num": "two three four five seven nine twelve twenty".split(),
}
_TEMPLATES = (
    "The {adj} {noun} was {adv} moved {prep} the {noun}.",
    "{name} {verb_past} the {adj} {noun} {time}.",
    "Please {verb} the {noun} {prep} the {place} before {name} arrives.",
    "Why did {name} {verb} the {adj} {noun} so {adv}?",
    "We saw {num} {adj} {noun}s {prep} the {place} {time}.",
    "{name} and {name} {verb_past} a {adj} {noun} at the {place}.",
    "Nobody {verb_past} the {noun} {prep} the {adj} {place}.",
    "Can you {verb} {num} {noun}s for the {place} {time}?",
)


def make_sentence(rng: np.random.Generator) -> str:
    """A random sentence of roughly 2-3 s of speech."""
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    out, rest = [], template
    while "{" in rest:  # fill each slot independently so repeated slots differ
        pre, _, tail = rest.partition("{")
        key, _, rest = tail.partition("}")
        out += [pre, _W[key][rng.integers(len(_W[key]))]]
    return "".join(out) + rest


# --- corpus ----------------------------------------------------------------------------------
def _has_variant(variant: str) -> bool:
    import espeakng_loader

    return (Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant).is_file()


def _synth_speaker(task) -> list[tuple[str, np.ndarray]]:
    """All utterances of one speaker: [(text, float32 16 kHz speech)]."""
    seed, k, s, n_utts = task
    engine, out = _Espeak.get(), []
    for j in range(n_utts):
        urng = np.random.default_rng([seed, k, j])
        text = make_sentence(urng)
        wav = engine.synth(text, s["voice"], s["variant"], s["rate"], s["pitch"], int(urng.integers(2**31)))
        out.append((text, to_mono_16k(wav, engine.sample_rate)))
    return out


def _run_speakers(tasks, workers: int | None):
    """Runs :func:`_synth_speaker` once per speaker, each in a FRESH process.

    espeak-ng keeps synthesis state in C statics that no API call resets (measured: the same text,
    voice and random seed synthesized twice in one process differ, even after espeak_Cancel or
    Terminate + Initialize), so an utterance depends on what the process synthesized before. A new process per
    speaker makes each speaker's audio depend only on its own parameters and seed, whatever ran
    before and however many workers there are.
    """
    import multiprocessing as mp

    # fork is cheap and the child starts from pristine espeak state unless this process already
    # initialized espeak (then spawn, which re-imports the package but starts clean).
    method = "fork" if "fork" in mp.get_all_start_methods() and _Espeak._instance is None else "spawn"
    workers = max(1, min(len(tasks), workers or os.cpu_count() or 1))
    with mp.get_context(method).Pool(workers, maxtasksperchild=1) as pool:
        return pool.map(_synth_speaker, tasks, chunksize=1)


def _recorded_training_speech(speakers: dict, recorded: list[tuple[str, str, np.ndarray]], source: str) -> list[tuple]:
    """Recorded training utterances ``[(speaker, words, clean)]`` as extra training speakers ``spkNN``
    (numbered after those already in ``speakers``, registered there with ``source``); utterances as in pass 1."""
    utts, ids, counts = [], {}, {}
    for spk_id, words, clean in recorded:
        if spk_id not in ids:
            ids[spk_id] = f"spk{len(speakers) + 1:02d}"
            speakers[ids[spk_id]] = dict(split="train", source=f"recorded: {source}/{spk_id}")
        spk = ids[spk_id]
        counts[spk] = counts.get(spk, 0) + 1
        utts.append(("train", spk, f"{spk}_{counts[spk]:03d}", words, clean.astype(np.float32)))
    if not utts:
        raise ValueError(f"no usable recordings of training speakers in {source}")
    return utts


def _noise_banks(spec: dict | None, cache_dir=None) -> dict | None:
    """``{"train": NoiseBank, "test": NoiseBank, "manifest": dict}`` for ``params["recorded_noise"]``:
    the corpus's training split draws from the "train" recordings, its test split from the "valid" ones
    of the training sources (held-out evaluation sources are left out altogether)."""
    if not spec:
        return None
    from . import recorded_noise

    # The held-out evaluation recordings never enter a corpus, not even its test split.
    train_sources = [s for s in recorded_noise.SOURCES if s.role == "train"]
    recordings = recorded_noise.find_recordings(spec["roots"], train_sources)
    missing = recorded_noise.missing_packages(recordings, role="train")
    if missing == sorted({s.package for s in recorded_noise.SOURCES if s.role == "train"}):
        raise FileNotFoundError(f"noise_roots: no recorded noise under {spec['roots']}; install e.g. "
                                f"`apt-get install {' '.join(missing)}`")
    return dict(train=recorded_noise.load_bank(recordings, "train", cache_dir),
                test=recorded_noise.load_bank(recordings, "valid", cache_dir),
                manifest=dict(recorded_noise.manifest(recordings), missing_packages=missing))


# Recorded utterances per "train" speaker when real speech is added (the demo's too): chosen on the
# real-speech VALID speakers among 10-40 (bench/results/realspeech_recipe/real_training_speech.md).
REAL_UTTS_PER_SPEAKER = 40


def synthesize_corpus(out_dir, n_train_speakers: int = 20, n_test_speakers: int = 2, utts_per_speaker: int = 10,
                      test_utts_per_speaker: int = 15, seed: int = 0, noise_types=NOISE_TYPES,
                      train_snrs=TRAIN_SNRS, test_snrs=TEST_SNRS, overwrite: bool = False,
                      workers: int | None = None, augment: bool = True, real_speech_dir=None,
                      real_utts_per_speaker: int | None = None, extra_speech_dirs=(), extra_utts_per_speaker: int = 20,
                      extra_speech_exclude=("Robot",), noise_roots=None, recorded_fraction: float = 0.6,
                      noise_cache=None) -> Path:
    """Writes a synthetic 16 kHz noisy/clean corpus to ``out_dir`` and returns ``out_dir``.

    Layout: ``clean_trainset_28spk_wav_16k``, ``noisy_trainset_28spk_wav_16k``, ``clean_testset_wav_16k``,
    ``noisy_testset_wav_16k`` (readable by :func:`pycosdist.data.load_corpus`), files
    ``spkNN_UUU.wav``, and ``manifest.json`` (parameters, speakers' voice settings, and per file:
    text, noise type, SNR). Train and test speakers are disjoint; babble for a split is made from
    the other speakers of that split. The noise type cycles through ``noise_types`` and the SNR is
    drawn from ``train_snrs`` / ``test_snrs``. Clean and noisy are scaled together so neither clips.

    The manifest is written last: if ``out_dir`` already holds a complete corpus made with the same
    parameters it is reused as is; different parameters raise unless ``overwrite=True``.
    ``workers`` processes synthesize speech (default: one per CPU); the output does not depend on it.
    ``augment``: training speech goes through :func:`pycosdist.denoise.augment.augment_speech`
    (before mixing, so the clean target is the augmented voice); the test split never does.
    ``real_speech_dir``: also train on recorded human voices, ``real_utts_per_speaker`` utterances
    (default :data:`REAL_UTTS_PER_SPEAKER`) of each "train" speaker of :func:`pycosdist.denoise.realspeech.training_utterances` (never a
    speaker of the real-speech valid or test sets), mixed like the synthetic training speech.
    """
    out_dir = Path(out_dir)
    params = dict(n_train_speakers=int(n_train_speakers), n_test_speakers=int(n_test_speakers),
                  utts_per_speaker=int(utts_per_speaker), test_utts_per_speaker=int(test_utts_per_speaker),
                  seed=int(seed), noise_types=list(noise_types), train_snrs=[float(s) for s in train_snrs],
                  test_snrs=[float(s) for s in test_snrs], sample_rate=SAMPLE_RATE, augment=bool(augment))
    if real_speech_dir is not None:  # only then, so that corpora made before the option stay valid
        real_utts_per_speaker = REAL_UTTS_PER_SPEAKER if real_utts_per_speaker is None else real_utts_per_speaker
        params["real_speech"] = dict(source_dir=str(real_speech_dir), utts_per_speaker=int(real_utts_per_speaker))
        if params["real_speech"]["utts_per_speaker"] < 1:
            raise ValueError(f"real_utts_per_speaker: expected >= 1, got {real_utts_per_speaker}")
    if extra_speech_dirs:
        params["extra_speech"] = dict(dirs=[str(d) for d in extra_speech_dirs], utts_per_speaker=int(extra_utts_per_speaker),
                                      exclude=sorted(extra_speech_exclude))
    if noise_roots is not None:
        if not 0.0 <= recorded_fraction <= 1.0:
            raise ValueError(f"recorded_fraction: expected a share in [0, 1], got {recorded_fraction!r}")
        # The cache folder is not part of the corpus's identity: where decoded audio is kept changes nothing.
        params["recorded_noise"] = dict(roots=[str(r) for r in noise_roots], fraction=float(recorded_fraction))
    if params["seed"] != seed or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    for key in ("n_train_speakers", "n_test_speakers", "utts_per_speaker", "test_utts_per_speaker"):
        if params[key] < 1:
            raise ValueError(f"{key}: expected >= 1, got {params[key]}")
    bad = [k for k in params["noise_types"] if k not in NOISE_TYPES]
    if bad or not params["noise_types"]:
        raise ValueError(f"noise_types: expected a non-empty subset of {NOISE_TYPES}, got {list(noise_types)}")
    if not params["train_snrs"] or not params["test_snrs"]:
        raise ValueError("train_snrs/test_snrs: expected non-empty lists of SNRs in dB")

    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text()).get("params")
        if old == params:
            return out_dir
        if not overwrite:
            raise FileExistsError(f"{out_dir} holds a corpus made with other parameters ({old}); "
                                  f"pass overwrite=True or choose another out_dir")
        manifest_path.unlink()

    rng = np.random.default_rng(seed)
    combos = [(v, var) for v in VOICES for var in VARIANTS if _has_variant(var)]
    n_spk = params["n_train_speakers"] + params["n_test_speakers"]
    if n_spk > len(combos):
        raise ValueError(f"n_train_speakers + n_test_speakers: at most {len(combos)} distinct voices, got {n_spk}")
    speakers = {}
    for idx, c in enumerate(rng.permutation(len(combos))[:n_spk]):
        voice, variant = combos[c]
        split = "train" if idx < params["n_train_speakers"] else "test"
        speakers[f"spk{idx + 1:02d}"] = dict(split=split, voice=voice, variant=variant,
                                             rate=int(rng.integers(140, 191)), pitch=int(rng.integers(25, 76)))

    # Pass 1: all clean speech (needed first: babble is made of other speakers' utterances).
    tasks = [(seed, k, s, params["utts_per_speaker"] if s["split"] == "train" else params["test_utts_per_speaker"])
             for k, s in enumerate(speakers.values())]
    utts = []  # (split, speaker, name, text, clean float32 16 kHz)
    for (spk, s), speech in zip(speakers.items(), _run_speakers(tasks, workers)):
        utts += [(s["split"], spk, f"{spk}_{j + 1:03d}", text, wav) for j, (text, wav) in enumerate(speech)]
    if real_speech_dir is not None:
        from .realspeech import training_utterances

        recorded = training_utterances(real_speech_dir, seed, params["real_speech"]["utts_per_speaker"])
        utts += _recorded_training_speech(speakers, recorded, str(real_speech_dir))
    for folder in params.get("extra_speech", {}).get("dirs", []):
        from .realspeech import folder_utterances

        extra = params["extra_speech"]
        recorded = folder_utterances(folder, seed, extra["utts_per_speaker"], exclude=extra["exclude"])
        utts += _recorded_training_speech(speakers, recorded, folder)
    banks = _noise_banks(params.get("recorded_noise"), noise_cache)

    # Pass 2: noise, mix, level, write.
    for split, (clean_name, noisy_name) in SPLIT_DIRS.items():
        for name in (clean_name, noisy_name):
            shutil.rmtree(out_dir / (name + SUFFIX_16K), ignore_errors=True)
    # Babble pools: other speakers of the same split (or of any split when a split has one speaker).
    pools = {"any": {}, "train": {}, "test": {}}
    for spk, s in speakers.items():
        pools["any"][spk] = [u[4] for u in utts if u[1] != spk]
        pools[s["split"]][spk] = [u[4] for u in utts if u[0] == s["split"] and u[1] != spk]
    files = []
    snr_choices = {"train": params["train_snrs"], "test": params["test_snrs"]}
    for i, (split, spk, name, text, clean) in enumerate(utts):
        mrng = np.random.default_rng([seed, 1_000_003, i])
        pool = pools[split].get(spk) or pools["any"][spk]
        kind = params["noise_types"][(i + int(spk[3:])) % len(params["noise_types"])]
        snr = float(snr_choices[split][mrng.integers(len(snr_choices[split]))])
        source = None
        nrng = np.random.default_rng([seed, 3_000_017, i])  # its own stream: corpora without recordings are unchanged
        if banks and nrng.uniform() < params["recorded_noise"]["fraction"]:
            bank = banks[split]
            family = bank.families[nrng.integers(len(bank.families))]
            kind = f"recorded:{family}"
        clean = clean.astype(np.float64)
        if params["augment"] and split == "train":
            clean = augment_speech(clean, np.random.default_rng([seed, 2_000_003, i]))
        clean *= 10 ** (mrng.uniform(-28, -20) / 20) / (np.sqrt(np.mean(clean ** 2)) + 1e-12)  # -28..-20 dBFS RMS
        if kind.startswith("recorded:"):
            noise, source = bank.sample(len(clean), nrng, family)
        else:
            noise = make_noise(kind, len(clean), mrng, pool)
        noisy = mix_at_snr(clean, noise, snr)
        peak = max(np.abs(noisy).max(), np.abs(clean).max())
        if peak > 0.99:
            clean, noisy = clean * (0.99 / peak), noisy * (0.99 / peak)
        clean_dir, noisy_dir = SPLIT_DIRS[split]
        write_audio(out_dir / (clean_dir + SUFFIX_16K) / f"{name}.wav", clean, SAMPLE_RATE, subtype="PCM_16")
        write_audio(out_dir / (noisy_dir + SUFFIX_16K) / f"{name}.wav", noisy, SAMPLE_RATE, subtype="PCM_16")
        files.append(dict(name=name, split=split, speaker=spk, text=text, noise=kind, snr_db=snr,
                          seconds=round(len(clean) / SAMPLE_RATE, 3), **({"noise_source": source} if source else {})))

    manifest = dict(params=params, speakers=speakers, files=files)
    if banks:
        manifest["recorded_noise"] = banks["manifest"]
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    return out_dir
