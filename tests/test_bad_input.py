"""Bad input is caught before any data, training or tracking I/O, as one line and exit code 2; killed and
resumed runs keep their metrics and leave nothing behind."""

import os
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from conftest import ROOT, synthetic_cfg
from ladc import checkpoints, stage1
from ladc.errors import LadcError


def one_line_error(capsys, fn, *argv):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        fn(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0], time.perf_counter() - t0


@pytest.fixture()
def fresh(tmp_path, monkeypatch):
    """A new, empty place for the default tracking store and Optuna journal (nothing exists yet)."""
    import ladc.tracking as T

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(T, "MLRUNS", tmp_path / "mlruns")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv,msg", [
    (["--dataset", "synthetic_lt", "--tau-range", "2", "1"], "empty search space"),
    (["--dataset", "synthetic_lt", "--set", "stage2.alpha=abc"], "stage2.alpha = 'abc' must be a finite number"),
    (["--dataset", "synthetic_lt", "--set", "stage1.epochs=1.5"], "stage1.epochs = 1.5 must be an integer"),
    (["--dataset", "synthetic_lt", "--method", "cbs"], "must be ladc or ladc_avg"),
    (["--dataset", "synthetic_lt", "--storage", "/proc/ladc/journal.log"], "--storage /proc/ladc/journal.log"),
    (["--dataset", "synthetic_lt", "--storage", "redis://x"], "unknown storage"),
    (["--dataset", "nope_lt"], "unknown dataset 'nope_lt'"),
    (["--dataset", "synthetic_lt", "--backbone-epochs", "0"], "--backbone-epochs 0"),
])
def test_tune_rejects_before_any_io(fresh, capsys, argv, msg):
    from ladc.cli import tune_main

    err, dt = one_line_error(capsys, tune_main, *argv)
    assert msg in err
    assert not (fresh / "mlruns").exists(), "a tracking store or journal was created before the check"


@pytest.mark.parametrize("argv,msg", [
    (["all", "--dataset", "synthetic_lt", "--method", "foo"], "unknown method 'foo'"),
    (["all", "--dataset", "synthetic_lt", "--set", "stage2.m=two"], "stage2.m = 'two' must be an integer"),
    (["stage1", "--dataset", "synthetic_lt", "--set", "stage1.remix=maybe"], "stage1.remix = 'maybe' must be true"),
    (["stage2", "--backbone-run", "feedbeef", "--set", "data.seed=3"], "uses only stage2 settings"),
    (["stage2", "--backbone-run", "feedbeef", "--tau", "-1"], "tau -1.0 is out of range"),
    (["stage1", "--resume", "feedbeef", "--epochs", "9"], "--epochs cannot change it"),
])
def test_train_rejects_before_any_io(fresh, capsys, argv, msg):
    from ladc.cli import train_main

    err, dt = one_line_error(capsys, train_main, *argv)
    assert msg in err
    assert not (fresh / "mlruns").exists()


def test_read_only_tracking_store_is_one_line(fresh, capsys, monkeypatch):
    from ladc.cli import train_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/ladc/mlflow.db")
    err, dt = one_line_error(capsys, train_main, "stage1", "--dataset", "synthetic_lt")
    assert "tracking store sqlite:////proc/ladc/mlflow.db" in err and dt < 5


def test_torn_journal_line_is_one_line(fresh, capsys):
    from ladc.tuning import open_storage, torn_journal_message

    path = fresh / "j.log"
    open_storage(str(path), fresh)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("x", "y", "z"):
        optuna.create_study(study_name=name, storage=open_storage(str(path), fresh)[0])
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    path.write_bytes(lines[0] + b'{"op_code": 0, "worker_id": "x", "study_na' + b"".join(lines[1:]))
    with pytest.raises(LadcError, match=r"damaged at line 2 .*sed -i '2d'"):
        open_storage(str(path), fresh)
    assert "line 2" in torn_journal_message(path)


def test_garbage_and_truncated_jpeg_name_the_file(tmp_path):
    from PIL import Image

    from ladc.data import build_dataset

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(tmp_path / split / c / f"{i}.jpg")
    cfg = {"dataset": "imagefolder_lt", "data_root": str(tmp_path), "imbalance_factor": None, "val_per_class": 0,
           "val_fraction": 0.25, "image_size": 8}
    build_dataset(cfg)  # fine as it is
    good = (tmp_path / "train" / "a" / "0.jpg").read_bytes()
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(LadcError, match=r"train/a/1.jpg cannot be decoded .*replace or delete"):
        build_dataset(cfg)
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(b"not an image at all")
    with pytest.raises(LadcError, match=r"train/a/1.jpg cannot be decoded"):
        build_dataset(cfg)


def test_class_without_training_images_is_an_error(tmp_path):
    from PIL import Image

    from ladc.data import build_dataset

    for split in ("train", "test"):
        for c, n in (("a", 5), ("b", 0 if split == "train" else 2)):  # b: a folder with no training image
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8)).save(tmp_path / split / c / f"{i}.png")
    with pytest.raises(LadcError, match="class\\(es\\) b have no training images"):
        build_dataset({"dataset": "imagefolder_lt", "data_root": str(tmp_path), "imbalance_factor": None,
                       "val_fraction": 0.3, "image_size": 8})


def test_torch_file_with_wrong_keys_is_not_a_checkpoint(tmp_path):
    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "other.pt")
    with pytest.raises(LadcError, match="not a ladc stage-1 checkpoint \\(missing model, optimizer"):
        checkpoints.load_checkpoint(tmp_path / "other.pt")


def test_finished_run_without_checkpoint_is_not_told_to_resume(store):
    exp = mlflow.create_experiment("x")
    rid = mlflow.MlflowClient().create_run(exp, tags={"stage": "stage1"}).info.run_id
    mlflow.MlflowClient().set_terminated(rid, "FINISHED")
    with pytest.raises(LadcError) as e:
        checkpoints.download_checkpoint(rid)
    assert "finished but its checkpoint" in str(e.value) and "--resume" not in str(e.value)
    rid2 = mlflow.MlflowClient().create_run(exp, tags={"stage": "stage1"}).info.run_id
    mlflow.MlflowClient().set_terminated(rid2, "KILLED")
    with pytest.raises(LadcError, match="ended before its first checkpoint: nothing to resume"):
        checkpoints.download_checkpoint(rid2)


def test_hard_kill_then_resume_logs_each_step_once_and_loses_minutes_not_epochs(store, monkeypatch):
    calls = {"n": 0}
    real = stage1.evaluate

    def die_on_second_eval(*a, **k):  # a crash (not Ctrl-C): no checkpoint on the way out
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut")
        return real(*a, **k)

    monkeypatch.setattr(stage1, "evaluate", die_on_second_eval)
    # checkpoint_every 100 epochs, but every 0.0001 minutes: the time rule saves each epoch
    with pytest.raises(RuntimeError):
        stage1.train_stage1(synthetic_cfg(checkpoint_every=100, checkpoint_minutes=0.0001), progress=False)
    run_id = mlflow.search_runs(search_all_experiments=True).run_id[0]
    assert checkpoints.download_checkpoint(run_id)["epoch"] == 3  # epoch 4 died in its evaluation
    monkeypatch.setattr(stage1, "evaluate", real)
    stage1.train_stage1({}, resume_run_id=run_id, progress=False)
    client = mlflow.MlflowClient()
    for key in ("train_loss", "val_top1", "test_top1"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(1, 7))


def test_no_temp_files_left_behind(store, tmp_path, monkeypatch):
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    run_id = stage1.train_stage1(synthetic_cfg(epochs=2, eval_every=2), progress=False)
    ckpt = checkpoints.download_checkpoint(run_id)
    assert ckpt["epoch"] == 2 and len(ckpt["sha256"]) == 64
    assert list(tmp.iterdir()) == []


def test_pyfunc_rejects_an_unknown_output(store):
    from mlflow.exceptions import MlflowException

    from ladc.serving import LadcPyfunc

    m = LadcPyfunc()
    with pytest.raises(MlflowException, match="output='nonsense' is not one of class_id, logits"):
        m.predict(None, None, params={"output": "nonsense"})


@pytest.mark.slow
def test_scripts_exit_2_without_traceback(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for argv in (["tune.py", "--dataset", "synthetic_lt", "--set", "stage2.alpha=abc"],
                 ["train.py", "stage1", "--dataset", "synthetic_lt", "--lr", "-1"]):
        r = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                           cwd=tmp_path, env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
