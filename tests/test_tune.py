import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import optuna
import pytest

from conftest import ROOT


@pytest.fixture()
def env(backbone, tmp_path, monkeypatch):
    """A fresh tracking store per test (copy of the session backbone's), study storage under it."""
    import shutil

    uri, run_id, cache = backbone
    src = uri[len("sqlite:///"):]
    db = tmp_path / "mlflow.db"
    shutil.copy(src, db)
    new_uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_uri)
    monkeypatch.setenv("LADC_MLRUNS", str(tmp_path))
    import ladc.tracking as T
    monkeypatch.setattr(T, "MLRUNS", tmp_path)
    T.setup_tracking()
    return {"run_id": run_id, "cache": str(cache), "tmp": tmp_path, "uri": new_uri}


def tune(env, *extra):
    from ladc.cli import tune_main

    return tune_main(["--dataset", "synthetic_lt", "--cache-dir", env["cache"], "--quiet", "--stage2-epochs", "4",
                          "--set", "stage2.milestones=[2, 3]", *extra])


def children(parent_id):
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_full_study_registers_and_promotes_then_worse_study_does_not(env):
    res = tune(env, "--n-trials", "5", "--study-name", "s1")
    assert res["backbone_run"] == env["run_id"] and res["n_finished"] == 5
    parent = mlflow.get_run(res["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "study"
    assert parent.data.tags["study_name"] == "s1" and "best_val_top1" in parent.data.metrics
    kids = children(res["parent_run_id"])
    trials = kids[kids["tags.stage"] == "trial"]
    assert len(trials) == 5
    for k in ("params.m", "params.alpha", "params.beta", "params.tau", "metrics.val_top1", "metrics.test_top1",
              "tags.trial_state"):
        assert trials[k].notna().all(), k
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res["parent_run_id"], "study")}
    assert {"study/trials.csv", "study/optimization_history.png"} <= arts
    client = mlflow.MlflowClient()
    champ = client.get_model_version_by_alias("ladc-synthetic_lt", "champion")
    assert str(champ.version) == "1" and res["promoted"]

    # a second study that cannot train (lr 1e-5, 1 epoch) is worse: registered, not promoted
    from ladc.cli import tune_main
    res2 = tune_main(["--dataset", "synthetic_lt", "--cache-dir", env["cache"], "--quiet", "--stage2-epochs", "1",
                          "--set", "stage2.lr=1e-5", "--n-trials", "3", "--study-name", "s2"])
    assert res2["refit_val_top1"] < float(champ.tags["val_top1"])
    assert str(res2["version"]) == "2" and not res2["promoted"]
    assert str(client.get_model_version_by_alias("ladc-synthetic_lt", "champion").version) == "1"

    # registry CLI: promote v2, then roll back to v1
    from ladc import registry
    registry.promote_version("synthetic_lt", 2)
    assert str(client.get_model_version_by_alias("ladc-synthetic_lt", "champion").version) == "2"
    assert registry.rollback("synthetic_lt") == "1"
    table = registry.versions_table("synthetic_lt")
    assert table.set_index("version").loc[1, "aliases"] == "champion"

    # the champion loads by alias and predicts class ids for uint8 images
    model = mlflow.pyfunc.load_model("models:/ladc-synthetic_lt@champion")
    imgs = np.random.RandomState(0).randint(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    ids = model.predict(imgs)
    assert ids.shape == (4,) and ids.dtype.kind == "i" and ((0 <= ids) & (ids < 5)).all()


def test_resume_after_interrupt_keeps_completed_trials(env, monkeypatch):
    import ladc.tuning as tuning

    real = tuning.run_stage2
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tuning, "run_stage2", flaky)
    with pytest.raises(SystemExit) as e:
        tune(env, "--n-trials", "6", "--study-name", "r")
    assert e.value.code == 130
    storage, _ = tuning.open_storage(None, env["tmp"] / "optuna")
    study = optuna.load_study(study_name="r", storage=storage)
    first = {t.number: t.params for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                                                  optuna.trial.TrialState.PRUNED))}
    assert len(first) == 3
    assert len(mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'")) == 0
    monkeypatch.setattr(tuning, "run_stage2", real)
    res = tune(env, "--n-trials", "6", "--study-name", "r")
    study = optuna.load_study(study_name="r", storage=storage)
    done = {t.number: t.params for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                                                 optuna.trial.TrialState.PRUNED))}
    assert len(done) == 6 and all(done[n] == p for n, p in first.items())
    trials = children(res["parent_run_id"])
    assert (trials["tags.stage"] == "trial").sum() == 6  # no completed trial was rerun
    assert len(mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'")) == 0


def test_failed_trial_is_recorded_and_study_goes_on(env, monkeypatch):
    import ladc.tuning as tuning
    from ladc.errors import LadcError

    real = tuning.run_stage2
    calls = {"n": 0}

    def nan_once(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            k["on_epoch"](1, {"val_top1": 0.0})  # the MLflow run exists by now in real runs; emulate the raise
            raise LadcError("stage-2 loss became nan at epoch 1: lower the stage-2 lr")
        return real(*a, **k)

    monkeypatch.setattr(tuning, "run_stage2", nan_once)
    res = tune(env, "--n-trials", "3", "--study-name", "f")
    storage, _ = tuning.open_storage(None, env["tmp"] / "optuna")
    study = optuna.load_study(study_name="f", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and res["n_finished"] == 3


@pytest.mark.slow
def test_two_processes_share_one_study(env):
    cmd = [sys.executable, str(ROOT / "tune.py"), "--dataset", "synthetic_lt", "--cache-dir", env["cache"], "--quiet",
           "--n-trials", "8", "--study-name", "par", "--stage2-epochs", "3", "--set", "stage2.milestones=[1, 2]",
           "--no-promote"]
    e = {**os.environ, "MLFLOW_TRACKING_URI": env["uri"], "LADC_MLRUNS": str(env["tmp"]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=e, cwd=env["tmp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-2500:] for o in outs)
    from ladc.tuning import open_storage
    storage, _ = open_storage(None, env["tmp"] / "optuna")
    study = optuna.load_study(study_name="par", storage=storage)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 8
    parents = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'study'")
    assert len(parents) == 1 and (children(parents.run_id[0])["tags.stage"] == "trial").sum() == 8


@pytest.mark.parametrize("extra,msg", [
    (["--tau-range", "2", "1"], "empty search space"),
    (["--m-range", "0", "2"], "m low 0 is out of range"),
    (["--beta-range", "0", "1"], "beta low 0.0 is out of range"),
    (["--m-range", "1", "1", "--alpha-range", "0.1", "0.1", "--beta-range", "1", "1", "--tau-range", "1", "1"], "every parameter is fixed"),
    (["--storage", "sqlite:////nonexistent-dir/x/optuna.db"], "Optuna storage"),
    (["--method", "cbs"], "must be ladc"),
])
def test_bad_input(env, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        tune(env, "--n-trials", "2", *extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_study_name_with_another_backbone_is_refused(env, capsys):
    from ladc.tuning import open_storage

    storage, _ = open_storage(None, env["tmp"] / "optuna")
    s = optuna.create_study(study_name="taken", storage=storage)
    s.set_user_attr("dataset", "synthetic_lt")
    s.set_user_attr("backbone_run", "someotherrun")
    with pytest.raises(SystemExit) as e:
        tune(env, "--n-trials", "2", "--study-name", "taken")
    assert e.value.code == 2 and "exists with backbone_run someotherrun" in capsys.readouterr().err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_on_loopback(env):
    tune(env, "--n-trials", "2", "--study-name", "srv")
    port = free_port()
    e = {**os.environ, "MLFLOW_TRACKING_URI": env["uri"]}
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/ladc-synthetic_lt@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        imgs = np.random.RandomState(1).randint(0, 256, (3, 16, 16, 3)).astype(np.uint8)
        body = json.dumps({"inputs": imgs.tolist()}).encode()
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    out = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "server did not answer"
                time.sleep(1)
        preds = out["predictions"]
        assert len(preds) == 3 and all(0 <= int(p) < 5 for p in preds)
        local = mlflow.pyfunc.load_model("models:/ladc-synthetic_lt@champion").predict(imgs)
        assert [int(p) for p in preds] == local.tolist()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ctrl_c_during_backbone_then_same_tune_command_continues_it(tmp_path, monkeypatch, capsys):
    import ladc.tracking as T
    from ladc import stage1
    from ladc.cli import tune_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(T, "MLRUNS", tmp_path / "mlruns")
    monkeypatch.chdir(tmp_path)
    real, calls = stage1.evaluate, {"n": 0}

    def ctrl_c_on_second_eval(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stage1, "evaluate", ctrl_c_on_second_eval)
    argv = ["--dataset", "synthetic_lt", "--n-trials", "2", "--quiet", "--stage2-epochs", "2",
            "--set", "stage2.milestones=[1]"]
    with pytest.raises(SystemExit) as e:
        tune_main(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err
    killed = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'stage1'")
    assert killed.status.tolist() == ["KILLED"]
    run_id = killed.run_id[0]
    assert f"python train.py stage1 --resume {run_id}" in err
    monkeypatch.setattr(stage1, "evaluate", real)
    res = tune_main(argv)
    assert res["backbone_run"] == run_id and mlflow.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 7))  # every epoch once: continued, not restarted
    assert len(mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'stage1'")) == 1
