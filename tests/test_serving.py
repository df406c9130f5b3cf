"""The served classifier refuses garbage (HTTP 400, short message) and answers ids, names, probabilities, logits."""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from ladc.models import ImageClassifier, create_model
from ladc.serving import LadcPyfunc, invalid, log_classifier, save_classifier
from ladc.stage2 import Classifier

CLASSES = ["cat", "dog", "ship", "frog", "bird"]


def tiny_model(seed=0) -> ImageClassifier:
    torch.manual_seed(seed)
    backbone = create_model("resnet8", len(CLASSES))
    clf = Classifier("crt", torch.zeros(len(CLASSES), backbone.feature_dim), torch.zeros(len(CLASSES)))
    torch.nn.init.normal_(clf.linear.weight, std=1.0)
    return ImageClassifier(backbone, clf, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).eval()


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    save_classifier(path, tiny_model(), "resnet8", "crt", CLASSES, image_size=[16, 16])
    return LadcPyfunc().load_state(torch.load(path, map_location="cpu", weights_only=True))


def images(n=4, seed=0, size=16):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize("bad,msg", [
    (images() / 255.0, "images must be uint8 pixel values 0..255; got float values in [0, 1]: multiply by 255 and round"),
    (images().astype(np.float32) / 255, "got float values in [0, 1]: multiply by 255 and round"),
    (images().astype(np.int64) + 1, "got values from 1 to 256: clip them to 0..255"),
    (images().astype(np.int64) - 300, "got values from -300 to -45: clip them to 0..255"),
    ((images() - 128.0) / 64, "got values from -2 to 1.98438: send raw pixels, not normalized ones"),
    (np.minimum(images(), 200) + 0.5, "got non-integer values: round them to whole numbers"),
    (np.where(images() > 250, np.nan, images().astype(float)), "got NaN values"),
    (np.where(images() > 250, np.inf, images().astype(float)), "got infinite values"),
    (images()[0], "got shape [16, 16, 3]: for one image send a batch of one, [1, H, W, 3]"),
    (images()[..., 0], "images must be a batch [B, H, W, 3] or [B, 3, H, W]; got shape [4, 16, 16]"),
    (np.zeros((2, 16, 16, 4), np.uint8), "got shape [2, 16, 16, 4]: images need 3 (RGB) channels"),
    (images(size=8), "images must be 16x16 for this model; got 8x8: resize them to 16x16"),
    (np.zeros((0, 16, 16, 3), np.uint8), "got an empty batch: send at least one image"),
    (np.full((1, 16, 16, 3), "12"), "got strings: send numbers, not strings"),
    (np.array([[[[{"r": 1}, 2, 3]]]], dtype=object), "got non-numeric values: send numbers, not strings or objects"),
    (images() > 100, "got booleans"),
    ([[[[1, 2, 3]]], [[[1, 2]]]], "got nested lists of different lengths"),
    (None, "got no images"),
])
def test_bad_images_are_refused_with_a_short_message(pyfunc, bad, msg):
    with pytest.raises(MlflowException) as e:
        pyfunc.predict(None, bad)
    assert msg in e.value.message and e.value.get_http_status_code() == 400
    assert len(e.value.message) < 160, e.value.message


def test_whole_pixel_values_of_any_dtype_give_the_same_ids(pyfunc):
    imgs = images(6)
    ids = pyfunc.predict(None, imgs)
    logits = pyfunc.predict(None, imgs, params={"output": "logits"})
    assert ids.shape == (6,) and ids.dtype.kind == "i"
    for same in (imgs.astype(np.int64), imgs.astype(np.int16), imgs.astype(np.float64), imgs.astype(np.float32),
                 imgs.tolist(), torch.as_tensor(imgs), np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))):
        assert pyfunc.predict(None, same).tolist() == ids.tolist()
        assert np.array_equal(pyfunc.predict(None, same, params={"output": "logits"}), logits)
    # all-black / all-white float images hold whole numbers (0.0, 1.0): pixel values, accepted
    assert pyfunc.predict(None, np.ones((2, 16, 16, 3))).shape == (2,)


def test_outputs(pyfunc):
    imgs = images(6)
    ids = pyfunc.predict(None, imgs, params={"output": "class_id"})
    assert ids.tolist() == pyfunc.predict(None, imgs).tolist()
    names = pyfunc.predict(None, imgs, params={"output": "name"})
    assert names.tolist() == [CLASSES[i] for i in ids]
    probs = pyfunc.predict(None, imgs, params={"output": "probabilities"})
    assert probs.shape == (6, 5) and np.allclose(probs.sum(1), 1) and (probs >= 0).all()
    assert (probs.argmax(1) == ids).all()
    logits = pyfunc.predict(None, imgs, params={"output": "logits"})
    assert logits.shape == (6, 5) and (logits.argmax(1) == ids).all()
    with pytest.raises(MlflowException, match="output='prob' is not one of class_id, logits, name, probabilities"):
        pyfunc.predict(None, imgs, params={"output": "prob"})


def test_message_survives_the_scoring_server_rewrite():
    e = invalid("images must be uint8 pixel values 0..255; got NaN values")
    e.message = f"Failed to predict data '{np.zeros(3)}'. \nError: {e.message}"  # what invocations() does
    body = json.loads(e.serialize_as_json())
    assert body["message"] == "images must be uint8 pixel values 0..255; got NaN values"
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"


def test_logged_model_loads_predicts_uint8_and_stores_image_size(store):
    with mlflow.start_run():
        info = log_classifier(tiny_model(), "resnet8", "crt", CLASSES,
                              torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    sig = info.signature
    assert sig.inputs is None and sig.params.to_dict()[0]["name"] == "output"
    model = mlflow.pyfunc.load_model(info.model_uri)
    imgs = images(3)
    ids = model.predict(imgs)
    assert ids.tolist() == model.predict(imgs.astype(np.int64)).tolist()
    assert model.predict(imgs, params={"output": "name"}).tolist() == [CLASSES[i] for i in ids]
    with pytest.raises(MlflowException, match=r"got float values in \[0, 1\]"):
        model.predict(imgs / 255.0)
    with pytest.raises(MlflowException, match="images must be 16x16 for this model; got 8x8"):
        model.predict(images(size=8))


def test_old_model_without_image_size_still_serves(tmp_path):
    path = tmp_path / "classifier.pt"
    save_classifier(path, tiny_model(), "resnet8", "crt", CLASSES)  # config as saved before image_size was stored
    old = LadcPyfunc().load_state(torch.load(path, map_location="cpu", weights_only=True))
    assert old.image_size is None
    assert old.predict(None, images(2, size=24)).shape == (2,)
    with pytest.raises(MlflowException, match="multiply by 255"):
        old.predict(None, images(2) / 255.0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, payload):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_served_model_refuses_floats_and_answers_names(backbone, monkeypatch):
    from ladc.stage2_tracking import load_backbone, run_stage2
    from ladc.tracking import setup_tracking
    from test_stage2 import params

    uri, run_id, cache = backbone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    setup_tracking()
    p = params(method="ladc", classifier="lws_plus", m=1, epochs=2, milestones=[1])
    bb = load_backbone(run_id, cache_dir=cache)
    *_, info, _ = run_stage2(bb, p, progress=False, plots=False)
    port = free_port()
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", info["model_uri"], "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        imgs = images(3)
        deadline = time.time() + 120
        while True:
            try:
                status, body = post(port, {"inputs": imgs.tolist()})
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "server did not answer"
                time.sleep(1)
        local = mlflow.pyfunc.load_model(info["model_uri"])
        assert status == 200, body
        assert json.loads(body)["predictions"] == local.predict(imgs).tolist()

        status, body = post(port, {"inputs": (imgs / 255.0).round(4).tolist()})
        assert status == 400, body
        err = json.loads(body)
        assert err["error_code"] == "INVALID_PARAMETER_VALUE"
        assert err["message"] == ("images must be uint8 pixel values 0..255; got float values in [0, 1]: "
                                  "multiply by 255 and round")
        assert "0.0" not in body and len(body) < 400  # the input is not echoed back

        status, body = post(port, {"inputs": imgs.tolist(), "params": {"output": "name"}})
        assert status == 200, body
        assert json.loads(body)["predictions"] == local.predict(imgs, params={"output": "name"}).tolist()
        assert set(json.loads(body)["predictions"]) <= set(bb.fs.classes)

        status, body = post(port, {"inputs": imgs[:, :8, :8].tolist()})
        assert status == 400 and "images must be 16x16 for this model; got 8x8" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)
