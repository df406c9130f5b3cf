
import mlflow
import numpy as np
import pytest
import torch

from ladc import features as F
from ladc.checkpoints import download_checkpoint
from ladc.stage2_tracking import load_backbone


@pytest.fixture()
def on_backbone(backbone, monkeypatch):
    uri, run_id, cache = backbone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from ladc.tracking import setup_tracking
    setup_tracking()
    return run_id, cache


def test_feature_cache_reused_and_keyed(on_backbone, tmp_path, monkeypatch):
    run_id, _ = on_backbone
    ckpt = download_checkpoint(run_id)
    import json
    data_cfg = json.loads(ckpt["config"])["data"]
    built = []

    real = F.build_dataset

    def loader(cfg):
        built.append(1)
        return real(cfg)

    monkeypatch.setattr(F, "build_dataset", loader)

    fs = F.get_features(ckpt, data_cfg, tmp_path, torch.device("cpu"), progress=False)
    assert fs.x["train"].shape == (430, 64) and len(built) == 1
    again = F.get_features(ckpt, data_cfg, tmp_path, torch.device("cpu"), progress=False)
    assert len(built) == 1 and torch.equal(again.x["test"], fs.x["test"])
    # another data spec or another checkpoint never reuses the features
    other = dict(data_cfg, seed=1)
    F.get_features(ckpt, other, tmp_path, torch.device("cpu"), progress=False)
    assert len(built) == 2
    assert F.cache_key("a" * 64, data_cfg) != F.cache_key("b" * 64, data_cfg)
    # a stale or broken file at the key's path is recomputed, not trusted
    path = tmp_path / f"{F.cache_key(ckpt['sha256'], data_cfg)}.pt"
    path.write_bytes(b"garbage")
    F.get_features(ckpt, data_cfg, tmp_path, torch.device("cpu"), progress=False)
    assert len(built) == 3 and F.load_cached(path, path.stem) is not None


def test_stage2_run_is_tracked_linked_and_ships_a_model(on_backbone):
    from ladc.stage2_tracking import run_stage2
    from test_stage2 import params

    run_id, cache = on_backbone
    p = params(method="ladc", classifier="lws_plus", m=1, epochs=4, milestones=[2, 3])
    rid, reports, history, info, _ = run_stage2(load_backbone(run_id, cache_dir=cache), p, progress=False)
    run = mlflow.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.tags["backbone_run_id"] == run_id and run.data.tags["stage"] == "stage2"
    for k in ("m", "alpha", "beta", "tau", "stage2.weighting", "stage2.head_fraction", "stage2.classifier"):
        assert k in run.data.params
    assert run.data.params["m"] == "1"
    assert [h.step for h in mlflow.MlflowClient().get_metric_history(rid, "stage2_val_top1")] == [1, 2, 3, 4]
    assert run.data.metrics["test_top1"] == pytest.approx(reports["test"]["top1"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(rid, "plots")}
    assert {"plots/confusion_test.png", "plots/per_class_accuracy.png"} <= arts
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    model = [m for m in models if m.source_run_id == rid][0]
    pyfunc = mlflow.pyfunc.load_model(model.model_uri)
    imgs = np.random.RandomState(0).randint(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    ids = pyfunc.predict(imgs)
    logits = pyfunc.predict(imgs, params={"output": "logits"})
    assert ids.shape == (3,) and logits.shape == (3, 5) and (logits.argmax(1) == ids).all()


def test_stage2_cli(on_backbone, capsys):
    from ladc.cli import train_main

    run_id, cache = on_backbone
    train_main(["stage2", "--backbone-run", run_id, "--method", "cbs", "--classifier", "lws", "--stage2-epochs", "2",
                "--cache-dir", str(cache)])
    assert "stage-2 run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train_main(["stage2", "--backbone-run", run_id, "--m", "9", "--cache-dir", str(cache)])
    assert e.value.code == 2
    assert "m 9 is out of range" in capsys.readouterr().err
    assert len(mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'")) == 0


def test_table_runs_every_row_as_child_runs(on_backbone, tmp_path):
    from test_stage2 import params

    from ladc.stage2_tracking import TABLE_ROWS, run_table

    run_id, cache = on_backbone
    out = tmp_path / "table.csv"
    df = run_table(load_backbone(run_id, cache_dir=cache), params(m=1, epochs=2, milestones=[1]), out=str(out))
    assert len(df) == len(TABLE_ROWS) and df["test_top1"].between(0, 100).all()
    bb = load_backbone(run_id, cache_dir=cache)
    stage1_acc = float(((bb.fs.x["test"] @ bb.fs.weight.T + bb.fs.bias).argmax(1) == bb.fs.y["test"]).float().mean())
    assert df.set_index("row").loc["CE", "test_top1"] == pytest.approx(stage1_acc * 100)  # CE = the stage-1 classifier
    assert df["test_top1"].nunique() > 3  # the rows are different fits, not one result repeated
    md = out.with_suffix(".md").read_text()
    assert "LADC + LWS-Plus" in md and "| row |" in md
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'table'").run_id[0]
    kids = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(kids) == len(TABLE_ROWS) and (kids.status == "FINISHED").all()
