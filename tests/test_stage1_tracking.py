import json
import subprocess
import sys

import mlflow
import pytest
import torch

from conftest import ROOT, synthetic_cfg
from ladc import checkpoints, stage1
from ladc.errors import LadcError


def runs(status=None):
    df = mlflow.search_runs(search_all_experiments=True)
    return df if status is None else df[df.status == status]


def test_stage1_learns_and_is_tracked(store):
    run_id = stage1.train_stage1(synthetic_cfg(), progress=False)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["stage1.backbone"] == "resnet8" and p["data.dataset"] == "synthetic_lt" and p["stage1.lr"] == "0.1"
    assert p["data.train_counts"] == "[200, 112, 63, 35, 20]"
    assert tags["stage"] == "stage1" and tags["dataset"] == "synthetic_lt" and tags["code_version"]
    assert m["test_top1"] > 45  # 5 classes: chance is 20%
    for k in ("val_top1", "val_many", "test_medium", "train_loss", "throughput_img_s", "lr"):
        assert k in m
    hist = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    assert [h.step for h in hist] == list(range(1, 7))
    ckpt = checkpoints.download_checkpoint(run_id)
    assert ckpt["epoch"] == 6 and ckpt["num_classes"] == 5
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "results")}
    assert "results/per_class_accuracy.csv" in arts
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/confusion_test.png", "plots/per_class_accuracy.png"} <= plots
    ds = run.inputs.dataset_inputs[0].dataset  # the UI's Dataset column
    assert ds.name == "synthetic_lt-if10-s0" and ds.digest == mlflow.get_run(run_id).data.tags["data_spec_key"]
    exp = mlflow.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]


def test_resume_continues_from_checkpoint_epoch(store, monkeypatch):
    calls = {"n": 0}
    real = stage1.evaluate

    def crash_on_second_eval(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 4, after the epoch-2 checkpoint: Ctrl-C checkpoints epoch 3, the last complete one
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stage1, "evaluate", crash_on_second_eval)
    with pytest.raises(KeyboardInterrupt):
        stage1.train_stage1(synthetic_cfg(), progress=False)
    killed = runs()
    assert killed.status.tolist() == ["KILLED"]
    run_id = killed.run_id[0]
    assert checkpoints.download_checkpoint(run_id)["epoch"] == 3
    monkeypatch.setattr(stage1, "evaluate", real)
    epochs_seen = []
    real_lr = stage1.lr_at
    monkeypatch.setattr(stage1, "lr_at", lambda step, spe, s: (epochs_seen.append(step // spe), real_lr(step, spe, s))[1])
    assert stage1.train_stage1({}, resume_run_id=run_id, progress=False) == run_id
    assert min(epochs_seen) == 3  # 0-based epoch 3 = the fourth epoch: continued after the checkpoint
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and checkpoints.download_checkpoint(run_id)["epoch"] == 6
    assert len(runs()) == 1


def test_failed_run_ends_failed(store, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stage1, "evaluate", boom)
    with pytest.raises(RuntimeError):
        stage1.train_stage1(synthetic_cfg(), progress=False)
    assert runs().status.tolist() == ["FAILED"]


def test_checkpoint_for_another_number_of_classes(store):
    run_id = stage1.train_stage1(synthetic_cfg(epochs=2, eval_every=2), progress=False)
    ckpt = checkpoints.download_checkpoint(run_id)
    with pytest.raises(LadcError, match="checkpoint is for 5 classes, the data has 10"):
        checkpoints.model_from_checkpoint(ckpt, num_classes=10)
    with pytest.raises(LadcError, match="not a stage-1 run|does not exist"):
        checkpoints.download_checkpoint("0123456789abcdef")


def test_checkpoint_loads_weights_only(tmp_path):
    from ladc.data import make_synthetic
    from ladc.models import create_model

    data = make_synthetic()
    m = create_model("resnet8", 5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    checkpoints.save_checkpoint(tmp_path / "c.pt", m, opt, 3, synthetic_cfg(), data)
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ck["epoch"] == 3 and json.loads(ck["config"])["stage1"]["backbone"] == "resnet8"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LadcError, match="cannot be read"):
        checkpoints.load_checkpoint(tmp_path / "bad.pt")


BAD = [
    (["stage1", "--dataset", "mnist_lt"], "unknown dataset 'mnist_lt'"),
    (["stage1", "--dataset", "synthetic_lt", "--backbone", "vgg"], "unknown backbone 'vgg'"),
    (["stage1", "--dataset", "synthetic_lt", "--imbalance-factor", "0.5"], "imbalance factor 0.5"),
    (["stage1", "--dataset", "synthetic_lt", "--epochs", "0"], "epochs 0"),
    (["stage1", "--dataset", "synthetic_lt", "--lr", "-1"], "lr -1.0"),
    (["stage1", "--dataset", "cifar10_lt", "--data-root", "/nonexistent/cifar"], "does not exist"),
    (["stage1", "--dataset", "synthetic_lt", "--set", "stage1.nope=1"], "unknown setting"),
    (["stage2", "--backbone-run", "feedbeef", "--m", "1"], "does not exist"),
]


@pytest.mark.parametrize("argv,msg", BAD)
def test_bad_input_one_line_exit_2(store, capsys, argv, msg):
    from ladc.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert len(runs("RUNNING")) == 0


@pytest.mark.slow
def test_cli_bad_input_subprocess_has_no_traceback(store, tmp_path):
    (tmp_path / "x").write_text("")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage1", "--dataset", "cifar10_lt", "--data-root",
                        str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_help_lists_commands():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "stage1" in r.stdout and "stage2" in r.stdout and "table" in r.stdout


def test_small_set_trains_min_steps_and_a_useless_backbone_is_flagged(store, capsys):
    # 430 synthetic images at batch 64 = 7 steps per epoch: 2 epochs are 14 steps < min_steps 20 -> 3 epochs
    run_id = stage1.train_stage1(synthetic_cfg(epochs=2, min_steps=20, eval_every=1, lr=1e-6, warmup_epochs=0,
                                               milestones=[2]), progress=False)
    run = mlflow.get_run(run_id)
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    assert run.data.params["stage1.epochs"] == "3" and run.info.run_name.startswith("stage1 e3 remix s0")
    err = capsys.readouterr()
    assert "stage1.min_steps 20" in err.out
    assert "near chance" in run.data.tags["warning"] and "near chance" in err.err  # lr 1e-6 learns nothing
