"""Command line: ``pycosdist {data,train-teacher,distill,evaluate,enhance,export,demo,experiment}`` (``-h`` on each)."""

from __future__ import annotations

import argparse
import json
import importlib.util
import sys
import tempfile
from pathlib import Path

# The [train] extra's modules (import name -> package name): the command needs all of them.
TRAIN_MODULES = {"scipy": "scipy", "threadpoolctl": "threadpoolctl", "pesq": "pesq", "pystoi": "pystoi",
                 "soundfile": "soundfile", "tqdm": "tqdm", "espeakng_loader": "espeakng-loader",
                 "matplotlib": "matplotlib"}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--data", type=Path, required=True, help="corpus root (VoiceBank+DEMAND layout)")
    p.add_argument("--out", type=Path, required=True, help="run directory (rerun to resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .distill import METHODS

    parser = argparse.ArgumentParser(prog="pycosdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="corpus tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="synthesize a noisy-speech corpus (espeak-ng + noises)")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-speakers", type=int, default=20)
    s.add_argument("--test-speakers", type=int, default=2)
    s.add_argument("--utts", type=int, default=10, help="utterances per training speaker")
    s.add_argument("--test-utts", type=int, default=15, help="utterances per test speaker")
    s.add_argument("--real-speech", type=Path, nargs="?", const=True, default=None,
                   metavar="DIR", help="also train on recorded human voices: the 'train' speakers of DIR (default "
                   "DIR: /usr/share/ktuberling/sounds), never those of `data realtest`'s valid or test sets")
    s.add_argument("--real-utts", type=int, default=None,
                   help="utterances per recorded training speaker (default: 40, synth.REAL_UTTS_PER_SPEAKER)")
    s.add_argument("--extra-speech", type=Path, action="append", default=[], metavar="DIR",
                   help="more recorded TRAINING voices: every speaker (sub-folder) of DIR, e.g. "
                   "/usr/share/games/hedgewars/Data/Sounds/voices (repeatable)")
    s.add_argument("--extra-utts", type=int, default=20, help="utterances per --extra-speech speaker")
    s.add_argument("--noise-root", type=Path, action="append", default=None, metavar="ROOT",
                   help="mix recorded noise from the Debian packages of recorded_noise.SOURCES installed under ROOT "
                   "(/ for apt-get installed ones, or a folder of packages unpacked with dpkg-deb -x; repeatable)")
    s.add_argument("--recorded-fraction", type=float, default=0.6,
                   help="share of files with recorded noise when --noise-root is given (default 0.6)")
    s.add_argument("--noise-cache", type=Path, default=None, metavar="DIR",
                   help="keep the decoded recorded noise here between builds")
    s = dsub.add_parser("prepare", help="make 16 kHz copies of a VoiceBank+DEMAND corpus")
    s.add_argument("root", type=Path)
    s = dsub.add_parser("realtest", help="real-speech evaluation set: recorded human voices (Debian's ktuberling-data) "
                                         "+ generated stationary noises, babble and held-out recorded ambiences "
                                         "(DIR/stationary, DIR/babble, DIR/recorded)")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", choices=("test", "valid"), default="test",
                   help="test: the speakers to report on; valid: other speakers, to choose a recipe on")
    s.add_argument("--source", type=Path, default=None,
                   help="folder of recordings, one sub-folder per speaker (default: /usr/share/ktuberling/sounds)")
    s.add_argument("--utts", type=int, default=3, help="utterances per speaker (default 3)")

    p = sub.add_parser("train-teacher", help="train a model without KD (a teacher, or any preset)")
    _add_train_args(p)

    p = sub.add_parser("distill", help="train a student with a KD method and a frozen teacher")
    _add_train_args(p)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--teacher", type=_checkpoint, required=True,
                   help="teacher checkpoint (e.g. RUN/best.pt; pretrained:teacher for the shipped one)")
    p.add_argument("--student", help="student model preset (default: the config's, else student_quarter)")

    p = sub.add_parser("evaluate", help="PESQ/STOI/SI-SDR of checkpoints (and the noisy input) on a test set")
    p.add_argument("--checkpoint", type=_checkpoint, nargs="+", required=True,
                   help="training checkpoints (RUN/best.pt) or shipped models (pretrained:teacher, pretrained:student)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--workers", type=int, default=2, help="scoring processes")
    p.add_argument("--device", default="cpu",
                   help="where the models run: cpu (the default), auto (CUDA if available), cuda, cuda:N")

    p = sub.add_parser("enhance", help="denoise audio files (any rate / channels; written as 16 kHz mono)")
    p.add_argument("inputs", type=Path, nargs="+", help="audio files or folders (searched recursively)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", type=_checkpoint, default=None,
                   help="a training checkpoint (.pt), an exported model (.ts, .onnx; see `pycosdist export`) or a "
                        "shipped model (pretrained:teacher, pretrained:student); default: the shipped student")
    p.add_argument("--device", default="cpu",
                   help="where a .pt model runs: cpu (the default), auto (CUDA if available), cuda, cuda:N; "
                        "exported models run on the CPU")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (an input file is never replaced)")
    p.add_argument("--stream", action="store_true",
                   help="process each file hop by hop, as a live stream would (same result): a causal .pt "
                        "checkpoint, or an exported stream.onnx / stream.ts; runs on the CPU")

    p = sub.add_parser("export", help="export a trained model's mask net (TorchScript, ONNX) for small devices")
    p.add_argument("--checkpoint", type=_checkpoint, required=True,
                   help="training checkpoint (e.g. RUN/best.pt; pretrained:NAME for a shipped model)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (model.ts, model.onnx, model.json)")
    p.add_argument("--format", nargs="+", default=["torchscript", "onnx"], choices=["torchscript", "onnx"])
    p.add_argument("--stream", action="store_true", help="export ONE HOP with explicit state (causal models only): "
                   "stream.ts, stream.onnx and stream.json, which documents every state tensor (docs/streaming.md)")

    p = sub.add_parser("experiment", help="repeated runs over mismatch scenarios and KD methods: mean ± std table",
                       epilog="`pycosdist experiment merge DIR... --out DIR` combines the outputs of --shard runs "
                              "(see `pycosdist experiment merge -h`)")
    p.add_argument("config", type=Path, nargs="?", help="experiment TOML (see configs/experiment.toml)")
    p.add_argument("--small", action="store_true", help="the small preset (about 45 min on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("experiment"), help="output folder (rerun to resume)")
    p.add_argument("--seeds", type=int, help="seeds per cell (0..N-1); overrides experiment.seeds")
    p.add_argument("--workers", type=int, help="evaluation worker processes; overrides experiment.eval_workers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. student.train.device=cuda, experiment.seeds=4 (repeatable)")
    p.add_argument("--shard", type=_shard, metavar="K/N",
                   help="run shard K of N: the cells of the seeds k with k mod N = K-1 (e.g. one Slurm array task "
                        "each); combine the N outputs with `pycosdist experiment merge`")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="synthesize, train, distill, evaluate, report (the make demo job)")
    p.add_argument("--out", type=Path, default=Path("report"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the demo teacher (about 4 minutes) instead of distilling from the shipped pretrained one")
    return parser


def _shard(text: str) -> tuple[int, int]:
    from .experiment import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:  # argparse prints it as a usage error (exit code 2)
        raise argparse.ArgumentTypeError(str(e).removeprefix("--shard: ")) from None


def _checkpoint(text: str) -> Path:
    """A checkpoint argument: a path, or ``pretrained:NAME`` for a model shipped with pycosdist."""
    from . import pretrained

    try:
        return pretrained.resolve(text)
    except (ValueError, FileNotFoundError) as e:  # argparse prints it as a usage error (exit code 2)
        raise argparse.ArgumentTypeError(str(e)) from None


def build_merge_parser() -> argparse.ArgumentParser:
    """``pycosdist experiment merge``: its own parser, since ``experiment`` takes an optional config path."""
    p = argparse.ArgumentParser(prog="pycosdist experiment merge",
                                description="combine the outputs of `pycosdist experiment --shard K/N` runs (all N "
                                            "of one experiment) into the tables a single run writes")
    p.add_argument("shards", type=Path, nargs="+", metavar="DIR", help="the --out folder of each shard")
    p.add_argument("--out", type=Path, required=True, help="folder for the merged tables (new, or an earlier merge)")
    return p


def _train_config(args, base: dict | None = None) -> dict:
    from . import config

    return config.load_config(args.config, args.overrides, base=base)


def writable_folder(path: Path, arg: str) -> Path:
    """Creates folder ``path`` if needed and checks that a file can be created in it, so that a command
    fails up front with one line instead of with a traceback after part of its work."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{arg}: {path} is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{arg}: cannot write to folder {path} ({e.strerror or e})") from None
    return path


def cmd_enhance(args) -> int:
    from . import enhance
    from .training import resolve_device, set_threads

    set_threads(0)
    if args.checkpoint is None:
        from . import pretrained

        shipped = pretrained.available()
        if not shipped:
            raise FileNotFoundError("--checkpoint: this installation ships no pretrained model; pass a checkpoint")
        args.checkpoint = pretrained.path("student" if "student" in shipped else shipped[0])
    device = resolve_device(args.device, arg="--device")
    if args.checkpoint.suffix.lower() in (".ts", ".onnx") and args.device == "auto":
        device = "cpu"  # exported models run on the CPU
    jobs = enhance.plan(args.inputs, args.out, overwrite=args.overwrite)
    if args.stream:
        denoise = enhance.load_stream(args.checkpoint, device)
    else:
        denoise = enhance.load_denoiser(args.checkpoint, device)
    writable_folder(args.out, "-o/--out")
    failed = enhance.enhance_files(jobs, denoise)
    if failed:
        print(f"pycosdist enhance: {len(failed)} of {len(jobs)} file(s) skipped:", file=sys.stderr)
        for source, reason in failed:
            print(f"  {source}: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from . import data, report
    from .training import load_model, resolve_device, set_threads

    set_threads(0)
    device = resolve_device(args.device, arg="--device")
    labels = {}
    for path in args.checkpoint:
        label = path.parent.name + ("" if path.stem == "best" else f"_{path.stem}")
        while label in labels:
            label += "_"
        labels[label] = path
    # Every checkpoint is read and checked before anything is scored; the loaded models are scored.
    loaded = {label: load_model(path) for label, path in labels.items()}
    corpus = data.load_corpus(args.data)
    dataset = corpus.test if args.split == "test" else corpus.valid
    writable_folder(args.out, "--out")
    rows = report.evaluate_checkpoints(loaded, dataset, args.out, workers=args.workers, progress=True,
                                       device=device)
    report.write_results(args.out, rows, {"data": str(args.data), "split": args.split,
                                          "checkpoints": {k: str(v) for k, v in labels.items()}})
    print(report.text_table(rows))
    failed = sum(r["n_failed"] for r in rows)
    if failed:
        print(f"warning: {failed} file score(s) failed; see {args.out}/*_summary.json", file=sys.stderr)
    dead = [r["model"] for r in rows if r["model"] in labels and r["n_ok"] == 0]
    if dead:
        print(f"pycosdist evaluate: error: every file failed for {', '.join(dead)} (results written; see "
              f"{args.out}/<model>_summary.json)", file=sys.stderr)
        return 1
    return 0


def missing_train_packages() -> list[str]:
    return [pkg for mod, pkg in TRAIN_MODULES.items() if importlib.util.find_spec(mod) is None]


def main(argv=None) -> int:
    missing = missing_train_packages()
    if missing:
        print(f"pycosdist: the command line needs the [train] extra (missing: {', '.join(missing)}). Install it "
              "with: pip install Cython setuptools numpy && pip install --no-build-isolation 'pycosdist[train]' "
              "(from a source checkout: \".[train]\")", file=sys.stderr)
        return 2
    from .audio import AudioError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["experiment", "merge"]:
        args = build_merge_parser().parse_args(argv[2:])
        args.command = "experiment merge"
    else:
        args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            if args.data_command == "synth":
                from .realspeech import KTUBERLING_DIR
                from .synth import synthesize_corpus

                writable_folder(args.out, "out")
                real_dir = KTUBERLING_DIR if args.real_speech is True else args.real_speech  # bare flag: the default
                out = synthesize_corpus(args.out, n_train_speakers=args.train_speakers, n_test_speakers=args.test_speakers,
                                        utts_per_speaker=args.utts, test_utts_per_speaker=args.test_utts, seed=args.seed,
                                        real_speech_dir=real_dir, real_utts_per_speaker=args.real_utts,
                                        extra_speech_dirs=args.extra_speech, extra_utts_per_speaker=args.extra_utts,
                                        noise_roots=args.noise_root, recorded_fraction=args.recorded_fraction,
                                        noise_cache=args.noise_cache)
                print(f"corpus written to {out}")
            elif args.data_command == "realtest":
                from . import realspeech

                out = realspeech.build_realtest(args.out, seed=args.seed, split=args.split, utts_per_speaker=args.utts,
                                                source_dir=args.source or realspeech.KTUBERLING_DIR)
                subsets = json.loads((out / realspeech.MANIFEST).read_text())["subsets"]
                print(f"real-speech {args.split} set written to {out} (evaluate on "
                      + ", ".join(str(out / s) for s in subsets) + ")")
            else:
                from .data import prepare_16k

                if args.root.is_dir():
                    writable_folder(args.root, "root")
                print(f"16 kHz copies under {prepare_16k(args.root)}")
        elif args.command in ("train-teacher", "distill"):
            from . import config, training

            if args.command == "distill":
                base = config.merge(config.DEFAULTS, {"model": {"preset": "student_quarter"}})
                cfg = _train_config(args, base)
                updates = {"kd": {"method": args.method, "teacher": str(args.teacher)}}
                if args.student:
                    updates["model"] = {"preset": args.student}
                cfg = config.merge(cfg, updates)
            else:
                cfg = _train_config(args)
                if cfg["kd"]["method"] != "none":
                    raise ValueError("train-teacher trains without KD; use `pycosdist distill` for kd.method "
                                     f"{cfg['kd']['method']!r}")
            cfg = training.check_train_config(cfg)  # a config error leaves no folder behind
            writable_folder(args.out, "--out")
            result = training.train(cfg, args.data, args.out, progress=not args.no_progress)
            print(f"best: {result['best']}  ({args.out}/best.pt, {result['params']:,} parameters)")
        elif args.command == "evaluate":
            return cmd_evaluate(args)
        elif args.command == "enhance":
            return cmd_enhance(args)
        elif args.command == "export":
            from .export import check_formats, export, export_stream
            from .training import load_model

            check_formats(args.format)  # the optional modules, before the checkpoint is loaded
            model = load_model(args.checkpoint)[0]
            if args.stream and not model.config.causal:
                print(f"pycosdist: error: --stream: {args.checkpoint} is not a causal model (model.causal = false); "
                      "train one from a causal preset, e.g. configs/student_causal.toml", file=sys.stderr)
                return 2
            writable_folder(args.out, "-o/--out")
            exported = (export_stream if args.stream else export)(model, args.out, args.format)
            for fmt, path in exported.items():
                print(f"{fmt}: {path}")
            print(f"interface: {args.out / ('stream.json' if args.stream else 'model.json')}")
        elif args.command == "experiment merge":
            from . import experiment

            experiment.merge_shards(args.shards, args.out)
        elif args.command == "experiment":
            from . import experiment

            given = {"seeds": args.seeds, "eval_workers": args.workers}
            overrides = experiment.parse_assignments(args.set)
            overrides.setdefault("experiment", {}).update({k: v for k, v in given.items() if v is not None})
            ex_cfg = experiment.load_config(args.config, small=args.small, overrides=overrides)
            if args.shard:
                experiment.shard_seeds(ex_cfg["experiment"]["seeds"], args.shard)  # N <= seeds, before --out is made
            writable_folder(args.out, "--out")
            experiment.run_experiment(ex_cfg, args.out, progress=not args.no_progress, shard=args.shard)
        elif args.command == "demo":
            from .demo import run_demo

            writable_folder(args.out, "--out")
            run_demo(args.out, progress=not args.no_progress, workers=args.workers, train_teacher=args.train_teacher)
    except (ValueError, KeyError, OSError, AudioError) as e:  # OSError: e.g. a disk that fills up
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"pycosdist {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
