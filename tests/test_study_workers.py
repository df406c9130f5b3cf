"""Studies that resume and share correctly: restarts and extra workers never replay configurations,
dead trials of any age are failed and replaced, workers started together all work."""

import os
import socket
import subprocess
import sys

import mlflow
import optuna
import pytest

from conftest import ROOT
from test_tune import children, env, tune  # noqa: F401 (fixture)

DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def load(env, name, storage=None):
    from ladc.tuning import open_storage

    st, _ = open_storage(storage, env["tmp"] / "optuna")
    return optuna.load_study(study_name=name, storage=st)


def configs(study):
    return [tuple(sorted(t.params.items())) for t in study.trials if t.params]


def test_resumed_study_draws_new_configurations(env):
    tune(env, "--n-trials", "4", "--study-name", "rep")
    res = tune(env, "--n-trials", "8", "--study-name", "rep")
    study = load(env, "rep")
    assert res["n_finished"] == 8 and len([t for t in study.trials if t.state in DONE]) == 8
    got = configs(study)
    assert len(got) == 8 and len(set(got)) == 8, got
    assert res["sampler_seed"] != 0  # the creator used --sampler-seed 0; the resuming process its own


def test_dead_trial_without_bookkeeping_is_failed_and_replaced(env):
    tune(env, "--n-trials", "2", "--study-name", "dead")
    study = load(env, "dead")
    orphan = study.ask()  # a process killed right after creating its trial: RUNNING, no worker recorded
    exp = mlflow.get_experiment_by_name("ladc-synthetic_lt").experiment_id
    ghost = mlflow.MlflowClient().create_run(exp, run_name="trial-ghost", tags={
        "stage": "trial", "study_name": "dead", "worker": f"{socket.gethostname()}:999999:deadbeef"}).info.run_id
    res = tune(env, "--n-trials", "4", "--study-name", "dead")
    study = load(env, "dead")
    assert res["n_finished"] == 4 and len([t for t in study.trials if t.state in DONE]) == 4
    assert study.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert mlflow.get_run(ghost).info.status == "KILLED"


def test_live_worker_is_not_reclaimed(env, tmp_path):
    from ladc.tuning import Worker

    with Worker(tmp_path / "w") as me, Worker(tmp_path / "w") as other:
        assert not me.is_dead(other.id) and not me.is_dead(me.id)
        assert me.is_dead(f"{socket.gethostname()}:1:gone")
        assert not me.is_dead("another-host:1:x")  # another machine: left to the storage's heartbeats
    assert Worker(tmp_path / "w").is_dead(other.id)


@pytest.mark.slow
def test_three_workers_started_together_on_a_new_sqlite_study(env):
    storage = f"sqlite:///{env['tmp'] / 'optuna.db'}"
    cmd = [sys.executable, str(ROOT / "tune.py"), "--dataset", "synthetic_lt", "--cache-dir", env["cache"], "--quiet",
           "--n-trials", "9", "--study-name", "trio", "--stage2-epochs", "3", "--set", "stage2.milestones=[1, 2]",
           "--storage", storage]
    e = {**os.environ, "MLFLOW_TRACKING_URI": env["uri"], "LADC_MLRUNS": str(env["tmp"]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=e, cwd=env["tmp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[1][-2500:] for o in outs)
    study = load(env, "trio", storage)
    assert len([t for t in study.trials if t.state in DONE]) == 9
    assert len(set(configs(study))) == len(configs(study))
    parents = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'study'")
    assert len(parents) == 1 and (children(parents.run_id[0])["tags.stage"] == "trial").sum() == len(study.trials)
    versions = mlflow.MlflowClient().search_model_versions("name = 'ladc-synthetic_lt'")
    assert len(versions) == 1  # registered once


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_chaos.py"), "--n-trials", "8", "--kills", "2"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-2000:]
