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
