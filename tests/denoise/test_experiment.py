"""The experiment runner on a tiny corpus: mean ± std and paired gains from the per-run rows (checked
against numpy / scipy.stats), seed pairing, lambda tuning on validation, resume skips finished cells."""

import csv

import numpy as np
import torch
import pytest

from pycosdist.denoise import experiment, training
from pycosdist.denoise.cli import main

TINY = """
[experiment]
scenarios = ["student_eighth", "student_shallow"]
methods = ["none", "cosine_lib"]
[corpus]
n_train_speakers = 3
n_test_speakers = 1
utts_per_speaker = 3
test_utts_per_speaker = 2
[teacher.model]
channels = [6, 8]
kernel_size = [3, 3]
bottleneck_layers = 1
[teacher.train]
epochs = 1
batch_size = 2
threads = 1
[teacher.data]
segment_seconds = 0.5
valid_speakers = 1
[student.train]
epochs = 1
batch_size = 2
threads = 1
[student.data]
segment_seconds = 0.5
valid_speakers = 1
"""


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    (d / "tiny.toml").write_text(TINY)
    assert main(["experiment", str(d / "tiny.toml"), "--out", str(d / "out"), "--no-progress",
                 "--seeds", "2", "--workers", "0"]) == 0
    return d


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_is_mean_and_std_of_the_runs(done):
    runs, rows = _read(done / "out" / "runs.csv"), _read(done / "out" / "results.csv")
    assert len(runs) == 2 * 2 * 2 and len(rows) == 2 * 2
    for row in rows:
        mine = [r for r in runs if (r["scenario"], r["variant"]) == (row["scenario"], row["variant"])]
        assert len(mine) == 2 and int(row["seeds"]) == 2
        for m in experiment.METRICS:
            vals = np.array([float(r[m]) for r in mine])
            assert np.isclose(float(row[f"{m}_mean"]), vals.mean())
            assert np.isclose(float(row[f"{m}_std"]), vals.std(ddof=1))
    # seeds differ, so the runs differ
    assert len({r["pesq"] for r in runs if r["scenario"] == "student_eighth" and r["method"] == "none"}) == 2
    md = (done / "out" / "results.md").read_text()
    assert "±" in md and "teacher" in md and "noisy input" in md and "Paired gain" in md
    assert (done / "out" / "pesq_vs_size.png").stat().st_size > 0
    text = (done / "out" / "runs" / "student_eighth" / "cosine_lib" / "seed1" / "config.toml").read_text()
    assert 'preset = "student_eighth"' in text and "seed = 1" in text and "lambda = 0.1" in text


def test_rerun_skips_finished_cells(done, monkeypatch):
    trained = []
    real = training.train

    def spy(cfg, data_dir, out_dir, **kw):
        trained.append(str(out_dir))
        return real(cfg, data_dir, out_dir, **kw)

    monkeypatch.setattr(training, "train", spy)
    before = (done / "out" / "runs.csv").read_text()
    cfg = experiment.load_config(done / "tiny.toml", overrides={"experiment": {"seeds": 2, "eval_workers": 0}})
    experiment.run_experiment(cfg, done / "out", log=lambda *_: None)
    assert [p for p in trained if "runs" in p] == []  # only the (finished) teacher is revisited
    assert (done / "out" / "runs.csv").read_text() == before


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment]\nseed = 3\n")
    with pytest.raises(KeyError, match=r"unknown experiment config key 'experiment.seed'; valid keys: .*experiment.seeds"):
        experiment.load_config(bad)
    bad.write_text("[student.train]\nepoch = 3\n")
    with pytest.raises(KeyError, match="unknown config key 'train.epoch'"):
        experiment.load_config(bad)
    bad.write_text('[experiment]\nscenarios = ["student_tiny"]\n')
    with pytest.raises(ValueError, match="unknown model preset 'student_tiny'"):
        experiment.load_config(bad)
    bad.write_text("[lambda]\ncosine = 1.0\n")
    with pytest.raises(KeyError, match="lambda.cosine"):
        experiment.load_config(bad)
    with pytest.raises(ValueError, match="experiment.seeds: expected >= 1, got 0"):
        experiment.load_config(overrides={"experiment": {"seeds": 0}})
    with pytest.raises(ValueError, match="experiment.eval_workers: expected >= 0"):
        experiment.load_config(overrides={"experiment": {"eval_workers": -1}})
    with pytest.raises(ValueError, match="experiment.seeds: expected a int"):
        experiment.load_config(overrides={"experiment": {"seeds": "3"}})
    assert experiment.load_config(small=True)["student"]["train"]["epochs"] == 6


def test_paired_gains_are_scipy_paired_t_intervals(done):
    from scipy import stats as scipy_stats

    runs, gains = _read(done / "out" / "runs.csv"), _read(done / "out" / "gains.csv")
    assert [(g["scenario"], g["variant"]) for g in gains] == [("student_eighth", "cosine_lib"),
                                                              ("student_shallow", "cosine_lib")]
    for g in gains:
        by_seed = lambda v: {r["seed"]: float(r["pesq"]) for r in runs if (r["scenario"], r["variant"]) == (g["scenario"], v)}
        base, kd = by_seed("none"), by_seed("cosine_lib")
        a, b = np.array([base[k] for k in sorted(base)]), np.array([kd[k] for k in sorted(base)])
        ci = scipy_stats.ttest_rel(b, a).confidence_interval(0.95)
        assert int(g["seeds"]) == 2 and float(g["pesq_gain"]) == pytest.approx((b - a).mean())
        assert float(g["pesq_ci_low"]) == pytest.approx(ci.low) and float(g["pesq_ci_high"]) == pytest.approx(ci.high)
    assert "seeds for 0.03 PESQ" in (done / "out" / "results.md").read_text()


def test_seed_pairs_the_student_init_and_data_order_across_methods(tmp_path, done):
    """Within a seed every method starts from the same student weights and sees the same crops in the
    same order (the KD module's init and the teacher load may not shift them); and a KD run with
    lambda = 0 then trains the same student as no KD (up to float rounding of the grad-clip norm)."""
    cfg = experiment.load_config(done / "tiny.toml")
    teacher, corpus = done / "out" / "teacher" / "best.pt", done / "out" / "corpus"
    methods = ("none", "cosine_lib", "mse_lib", "cosine_linear", "fitnet_mse")

    def setup(method, seed):
        run_cfg = experiment.student_config(cfg, "student_eighth", method, seed, teacher, expansion=2, lam=0.0)
        return training.Run(training.check_train_config(run_cfg), corpus, tmp_path / f"{method}{seed}", False,
                            lambda *_: None)

    def order(run, epoch):
        run.batches.crops.set_epoch(epoch)
        return [(int(i), run.batches.crops[int(i)][3]) for idx, _ in run.batches.local_batches(epoch) for i in idx]

    runs = {m: setup(m, 1) for m in methods}
    other_seed = setup("none", 2)
    assert not torch.equal(runs["none"].model.encoder[0][0].weight, other_seed.model.encoder[0][0].weight)
    assert order(runs["none"], 0) != order(other_seed, 0)
    for method in methods[1:]:
        for k, v in runs["none"].model.state_dict().items():
            assert torch.equal(v, runs[method].model.state_dict()[k]), (method, k)
        assert all(order(runs[method], e) == order(runs["none"], e) for e in (0, 1))

    trained = {}
    for method in ("none", "cosine_lib"):
        run_cfg = experiment.student_config(cfg, "student_eighth", method, 1, teacher, lam=0.0)
        training.train(run_cfg, corpus, tmp_path / f"trained_{method}", progress=False, log=lambda *_: None)
        trained[method] = training.load_model(tmp_path / f"trained_{method}" / "last.pt")[0].state_dict()
    for k, v in trained["none"].items():
        if v.is_floating_point():
            torch.testing.assert_close(trained["cosine_lib"][k], v, rtol=1e-4, atol=1e-5 * float(v.abs().max()))


def test_ablation_variants_and_tuning_on_validation(tmp_path, done):
    text = (TINY.replace('methods = ["none", "cosine_lib"]', 'methods = ["none", "cosine_lib", "cosine_linear", "mse_lib"]\n'
                         'expansions = [1, 4]\nseeds = 1')
            .replace('scenarios = ["student_eighth", "student_shallow"]', 'scenarios = ["student_shallow"]')
            + '[tuning]\nfactors = [0.5, 2]\n')
    (tmp_path / "abl.toml").write_text(text)
    cfg = experiment.load_config(tmp_path / "abl.toml", overrides={"experiment": {"corpus": str(done / "out" / "corpus"),
                                                                                   "eval_workers": 0}})
    assert [v[0] for v in experiment.variants(cfg)] == ["none", "cosine_lib_e1", "cosine_lib", "cosine_linear",
                                                       "mse_lib_e1", "mse_lib"]
    result = experiment.run_experiment(cfg, tmp_path / "out", log=lambda *_: None)
    tuning = _read(tmp_path / "out" / "tuning.csv")
    assert len(tuning) == 5 * 2  # every KD variant: the same 2 factors x 1 seed
    for variant in ("cosine_lib_e1", "cosine_lib", "cosine_linear", "mse_lib_e1", "mse_lib"):
        mine = [r for r in tuning if r["variant"] == variant]
        best = min(mine, key=lambda r: float(r["valid_loss"]))  # student valid_metric = loss: lower wins
        assert [r["chosen"] for r in mine].count("True") == 1 and best["chosen"] == "True"
        assert result["lambdas"][("student_shallow", variant)] == pytest.approx(float(best["lambda"]))
        ckpt = training.load_checkpoint(tmp_path / "out" / "runs" / "student_shallow" / variant / "seed0" / "best.pt")
        assert ckpt["config"]["kd"]["lambda"] == pytest.approx(float(best["lambda"]))
        assert ckpt["config"]["kd"]["method"] == variant.split("_e")[0]
    assert training.load_checkpoint(tmp_path / "out" / "runs" / "student_shallow" / "mse_lib_e1" / "seed0" /
                                    "best.pt")["config"]["kd"]["expansion"] == 1
    assert {r["seed"] for r in tuning} == {str(experiment.TUNING_SEED0)}
    # a finished cell is never silently reused under other settings
    with pytest.raises(ValueError, match="kd.lambda"):
        experiment.run_experiment(experiment.load_config(tmp_path / "abl.toml", overrides={
            "experiment": {"corpus": str(done / "out" / "corpus"), "eval_workers": 0},
            "tuning": {"factors": []}, "lambda": {"cosine_lib": 0.7}}), tmp_path / "out", log=lambda *_: None)


def test_set_overrides_reach_the_config_and_bad_ones_exit_2(tmp_path, capsys):
    overrides = experiment.parse_assignments(["student.train.epochs=2", "teacher.model.norm=group",
                                              "experiment.expansions=[1, 8]", "tuning.factors=[0.5, 2]",
                                              "experiment.scenarios=['student_shallow']"])
    cfg = experiment.load_config(overrides=overrides)
    assert cfg["student"]["train"]["epochs"] == 2 and cfg["teacher"]["model"]["norm"] == "group"
    assert cfg["experiment"]["expansions"] == [1, 8] and cfg["tuning"]["factors"] == [0.5, 2.0]
    assert cfg["experiment"]["scenarios"] == ["student_shallow"]
    for bad, message in (("student.train.epoch=2", "train.epoch"), ("experiment.seed=2", "experiment.seed"),
                         ("seeds", "KEY=VALUE"), ("experiment.expansions=[0]", "experiment.expansions"),
                         ("tuning.factors=[-1]", "tuning.factors")):
        assert main(["experiment", "--set", bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing written before the config is valid


def test_ablation_contrasts_are_paired_by_seed():
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(3)
    runs = []
    for seed in range(5):
        base = rng.normal(1.7, 0.05)
        for variant, shift in (("none", 0.0), ("cosine_lib", 0.02), ("mse_lib", 0.0), ("cosine_lib_e8", 0.01)):
            runs.append({"scenario": "s", "variant": variant, "seed": seed, "pesq": base + shift + rng.normal(0, 0.01)})
    rows = {r["contrast"]: r for r in experiment.paired_contrasts(runs)}
    assert set(rows) == {"cosine_lib - mse_lib", "cosine_lib_e8 - cosine_lib"}
    pesq = lambda v: np.array([r["pesq"] for r in runs if r["variant"] == v])
    ci = scipy_stats.ttest_rel(pesq("cosine_lib"), pesq("mse_lib")).confidence_interval(0.95)
    r = rows["cosine_lib - mse_lib"]
    assert r["seeds"] == 5 and r["pesq_diff"] == pytest.approx((pesq("cosine_lib") - pesq("mse_lib")).mean())
    assert (r["pesq_ci_low"], r["pesq_ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert "cosine vs MSE, both through the LIB" in experiment.contrasts_markdown(list(rows.values()))


def test_cells_trained_together_match_cells_trained_one_at_a_time(done, tmp_path):
    """The fixture's experiment trained each seed's cells 2 at a time (experiment.train_workers = 0:
    automatic) on this multi-core machine; one at a time, in this process, gives the same runs."""
    if training.concurrent_runs() < 2:
        pytest.skip("needs 2 CPU cores: with one, every experiment trains one run at a time")
    logs = []
    cfg = experiment.load_config(done / "tiny.toml", overrides={
        "experiment": {"seeds": 2, "eval_workers": 0, "train_workers": 1, "corpus": str(done / "out" / "corpus")}})
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "teacher").symlink_to(done / "out" / "teacher")  # the same teacher
    experiment.run_experiment(cfg, tmp_path / "one", log=logs.append)
    assert not any("at a time" in m for m in logs)
    together, alone = _read(done / "out" / "runs.csv"), _read(tmp_path / "one" / "runs.csv")
    assert [(r["scenario"], r["variant"], r["seed"]) for r in together] == \
           [(r["scenario"], r["variant"], r["seed"]) for r in alone]
    for a, b in zip(together, alone):
        for m in ("pesq", "stoi", "si_sdr"):
            assert float(a[m]) == pytest.approx(float(b[m]), rel=1e-4, abs=1e-4), (a, b)


# --- shards ----------------------------------------------------------------------------------------
SHARDED = TINY.replace('scenarios = ["student_eighth", "student_shallow"]', 'scenarios = ["student_eighth"]')


def _table(path, drop=()):
    return [{k: v for k, v in row.items() if k not in drop} for row in _read(path)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, done):
    """The SHARDED grid (3 seeds x 2 methods) once whole and once as 3 shards, on the corpus of ``done``;
    shard 3 is given shard 1's teacher (experiment.teacher) instead of training its own."""
    d = tmp_path_factory.mktemp("shards")
    (d / "grid.toml").write_text(SHARDED)
    common = ["experiment", str(d / "grid.toml"), "--no-progress", "--seeds", "3", "--workers", "0",
              "--set", f"experiment.corpus={done / 'out' / 'corpus'}"]
    assert main(common + ["--out", str(d / "whole")]) == 0
    for k in (1, 2, 3):
        extra = ["--set", f"experiment.teacher={d / 'shard1' / 'teacher' / 'best.pt'}"] if k == 3 else []
        assert main(common + extra + ["--shard", f"{k}/3", "--out", str(d / f"shard{k}")]) == 0
    return d


def test_three_shards_merge_to_the_tables_of_one_run(shards):
    d = shards
    assert [r["seed"] for r in _read(d / "shard2" / "runs.csv")] == ["1", "1"]  # seed k goes to shard k mod 3 + 1
    assert not (d / "shard3" / "teacher").exists()
    assert main(["experiment", "merge", str(d / "shard3"), str(d / "shard1"), str(d / "shard2"),
                 "--out", str(d / "merged")]) == 0
    for table in ("results.csv", "gains.csv"):
        assert (d / "merged" / table).read_text() == (d / "whole" / table).read_text(), table
    # train_seconds is the wall time of each cell's training: the one column two runs cannot share
    assert _table(d / "merged" / "runs.csv", drop=("train_seconds",)) == _table(d / "whole" / "runs.csv",
                                                                                drop=("train_seconds",))
    whole_md, merged_md = ((d / x / "results.md").read_text().rsplit("KD weights", 1) for x in ("whole", "merged"))
    assert merged_md[0] == whole_md[0] and "Merged from 3 shard(s)" in merged_md[1]
    assert (d / "merged" / "pesq_vs_size.png").is_file()
    # the merge may be written again over its own output, and only there
    assert main(["experiment", "merge", str(d / "shard1"), str(d / "shard2"), str(d / "shard3"),
                 "--out", str(d / "merged")]) == 0


@pytest.mark.parametrize("case, expected", [
    ("missing", "missing shard(s) 3/3 (seeds 2)"),
    ("twice", "are both shard 1/3: their cells overlap"),
    ("other config", "shards of different experiments (student.train.lr: 0.002 -> 0.005)"),
    ("other split", "merge the shards of one split"),
    ("unfinished", "has 1 unfinished cell(s), first student_eighth/none/seed1"),
    ("into a shard", "is one of the shards"),
    ("into other files", "already holds files that are not a merge's output"),
])
def test_merge_refuses_shards_that_are_not_one_whole_experiment(shards, tmp_path, capsys, case, expected):
    d = shards
    dirs = [d / f"shard{k}" for k in (1, 2, 3)]
    out = tmp_path / "merged"

    def altered(k, change):  # a copy of shard k's results.json with ``change`` applied
        import json

        copy = tmp_path / f"altered{k}"
        copy.mkdir()
        res = json.loads((d / f"shard{k}" / "results.json").read_text())
        change(res)
        (copy / "results.json").write_text(json.dumps(res))
        return copy

    if case == "missing":
        dirs = dirs[:2]
    elif case == "twice":
        dirs = [dirs[0], dirs[0], dirs[2]]
    elif case == "other config":
        dirs[1] = altered(2, lambda r: r["config"]["student"]["train"].update(lr=0.005))
    elif case == "other split":
        dirs[1] = altered(2, lambda r: r.update(shard=[2, 4]))
    elif case == "unfinished":
        dirs[1] = altered(2, lambda r: r["runs"].pop(0))
    elif case == "into a shard":
        out = dirs[0]
    elif case == "into other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert main(["experiment", "merge", *map(str, dirs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    if case == "into other files":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize("shard, expected", [
    ("0/3", "expected K/N with 1 <= K <= N"), ("4/3", "expected K/N"), ("2", "expected K/N"), ("a/b", "expected K/N"),
    ("1/4", "splits 3 seed(s) 4 ways"),
])
def test_a_bad_shard_is_a_usage_error(tmp_path, capsys, shard, expected):
    (tmp_path / "grid.toml").write_text(SHARDED)
    argv = ["experiment", str(tmp_path / "grid.toml"), "--seeds", "3", "--shard", shard, "--out", str(tmp_path / "out")]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_torchrun_per_cell(tmp_path, done, capfd):
    """experiment.torchrun = 2: each cell trains as 2 gloo processes under torchrun (the DDP run itself
    is checked against one process in test_distributed); the experiment evaluates their checkpoints and
    a rerun finds every cell finished."""
    (tmp_path / "grid.toml").write_text(SHARDED.replace('methods = ["none", "cosine_lib"]',
                                                        'methods = ["none", "cosine_lib"]\ntorchrun = 2'))
    argv = ["experiment", str(tmp_path / "grid.toml"), "--no-progress", "--seeds", "1", "--workers", "0",
            "--set", f"experiment.corpus={done / 'out' / 'corpus'}",
            "--set", f"experiment.teacher={done / 'out' / 'teacher' / 'best.pt'}", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capfd.readouterr().out
    assert out.count("torch.distributed.run --standalone --nproc-per-node 2 -m pycosdist") == 2
    assert "-m pycosdist train-teacher --config" in out and "-m pycosdist distill --method cosine_lib" in out
    assert [(r["variant"], r["seed"]) for r in _read(tmp_path / "out" / "runs.csv")] == [("none", "0"),
                                                                                         ("cosine_lib", "0")]
    for variant in ("none", "cosine_lib"):
        cell = tmp_path / "out" / "runs" / "student_eighth" / variant / "seed0"
        assert (cell / "cell.toml").is_file() and training.load_checkpoint(cell / "last.pt")["epoch"] == 1
    assert main(argv) == 0
    assert "torch.distributed.run" not in capfd.readouterr().out  # finished cells are not trained again


def test_the_slurm_script_runs_its_array_task_as_a_shard(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "slurm_experiment.sh"
    base = {"PATH": os.environ["PATH"], "PYCOSDIST": "echo pycosdist"}  # echo: the command it would run

    def run(*args, **env):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env={**base, **env})

    done = run("grid.toml", "/scratch/exp", "4", "--set", "student.train.device=cuda", SLURM_ARRAY_TASK_ID="3",
               TEACHER="/scratch/teacher.pt")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pycosdist", "experiment", "grid.toml", "--shard", "3/4", "--out",
                                   "/scratch/exp/shard3", "--no-progress", "--set",
                                   "experiment.teacher=/scratch/teacher.pt", "--set", "student.train.device=cuda"]
    assert run("grid.toml", "/scratch/exp", "4").returncode == 2  # not an array task
    missing = run("grid.toml", SLURM_ARRAY_TASK_ID="1")
    assert missing.returncode == 2 and "usage:" in missing.stderr
