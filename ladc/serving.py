"""The shippable classifier as an MLflow pyfunc model: uint8 images [B, H, W, 3] (or [B, 3, H, W]) in,
class ids out (params={"output": ...}: "class_id", "name", "probabilities" or "logits"). Anything that is not
whole pixel values 0..255 of the model's image size is refused with a short message (HTTP 400 when served)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from .models import ImageClassifier, create_model
from .stage2 import Classifier



def build_classifier(state: dict) -> ImageClassifier:
    """Rebuild backbone + stage-2 head from a saved state (see `save_classifier`)."""
    cfg = json.loads(state["config"])
    backbone = create_model(cfg["backbone"], cfg["num_classes"])
    C, d = cfg["num_classes"], backbone.feature_dim
    clf = Classifier(cfg["classifier"], torch.zeros(C, d), torch.zeros(C))
    model = ImageClassifier(backbone, clf, cfg["mean"], cfg["std"])
    # models saved before the stage-2 classifier was named `classifier` call it `head`
    model.load_state_dict({("classifier." + k[5:] if k.startswith("head.") else k): v for k, v in state["model"].items()})
    return model.eval()


def save_classifier(path: Path, model: ImageClassifier, backbone_name: str, classifier: str, classes: list,
                    image_size: list | None = None) -> None:
    cfg = {"backbone": backbone_name, "classifier": classifier, "num_classes": len(classes), "classes": classes,
           "mean": (model.mean.flatten() / 255).tolist(), "std": (model.std.flatten() / 255).tolist()}
    if image_size is not None:
        cfg["image_size"] = [int(v) for v in image_size]  # [H, W] the model was trained on
    torch.save({"model": model.state_dict(), "config": json.dumps(cfg)}, path)


PIXELS = "images must be uint8 pixel values 0..255"
SHAPE = "images must be a batch [B, H, W, 3] or [B, 3, H, W]"


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def check_images(images, image_size: list | None = None) -> torch.Tensor:
    """Validate a batch of images and return it as a uint8 NCHW tensor; raise `invalid` (HTTP 400 when served)
    with a short message naming the problem and the fix. Integer-valued inputs in 0..255 are accepted whatever
    their dtype (JSON turns pixels into int64, or float64 when any value has a fraction)."""
    if images is None:
        raise invalid(f"{SHAPE}; got no images")
    if hasattr(images, "to_numpy"):  # a DataFrame: one column holding one image per row
        if images.shape[1] != 1:
            raise invalid(f'{SHAPE}; got a table with {images.shape[1]} columns: send {{"inputs": <images>}}')
        try:
            images = np.stack([np.asarray(v) for v in images.iloc[:, 0].to_list()]) if len(images) else np.zeros(0)
        except ValueError:
            raise invalid(f"{SHAPE}; got images of different sizes") from None
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    try:
        x = np.asarray(images)
    except ValueError:  # ragged nested lists
        raise invalid(f"{SHAPE}; got nested lists of different lengths (images of different sizes?)") from None
    if x.dtype.kind == "O":  # numbers mixed with other objects, or None
        try:
            x = x.astype(np.float64)
        except (TypeError, ValueError):
            raise invalid(f"{PIXELS}; got non-numeric values: send numbers, not strings or objects") from None
    if x.dtype.kind in "USV":
        raise invalid(f"{PIXELS}; got strings: send numbers, not strings")
    if x.dtype.kind == "b":
        raise invalid(f"{PIXELS}; got booleans: send numbers 0..255")
    if x.dtype.kind == "c":
        raise invalid(f"{PIXELS}; got complex numbers: send real numbers 0..255")
    if x.dtype.kind not in "uif":
        raise invalid(f"{PIXELS}; got dtype {x.dtype}: send numbers 0..255")
    if x.ndim != 4:
        hint = ": for one image send a batch of one, [1, H, W, 3]" if x.ndim == 3 else ""
        raise invalid(f"{SHAPE}; got shape {list(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise invalid(f"{SHAPE}; got an empty batch: send at least one image")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        hw = x.shape[1:3]
    elif x.shape[1] == 3:
        hw = x.shape[2:4]
    else:
        raise invalid(f"{SHAPE}; got shape {list(x.shape)}: images need 3 (RGB) channels")
    if image_size is not None and list(hw) != list(image_size):
        h, w = image_size
        raise invalid(f"images must be {h}x{w} for this model; got {hw[0]}x{hw[1]}: resize them to {h}x{w}")
    if min(hw) == 0:
        raise invalid(f"{SHAPE}; got shape {list(x.shape)}: images are empty")
    if x.dtype.kind == "f":
        if np.isnan(x).any():
            raise invalid(f"{PIXELS}; got NaN values: replace them with pixel values")
        if np.isinf(x).any():
            raise invalid(f"{PIXELS}; got infinite values: replace them with pixel values")
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 255:
        hint = ("send raw pixels, not normalized ones" if x.dtype.kind == "f" and lo >= -10 and hi <= 10
                else "clip them to 0..255")
        raise invalid(f"{PIXELS}; got values from {_fmt(lo)} to {_fmt(hi)}: {hint}")
    if x.dtype.kind == "f" and not (x == np.round(x)).all():
        if hi <= 1:
            raise invalid(f"{PIXELS}; got float values in [0, 1]: multiply by 255 and round")
        raise invalid(f"{PIXELS}; got non-integer values: round them to whole numbers")
    return to_nchw(x.astype(np.uint8))


def to_nchw(images: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


class LadcPyfunc(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True  # numpy in, numpy out, checked in predict (no MLflow type-hint warning)

    def load_context(self, context):
        state = torch.load(context.artifacts["classifier"], map_location="cpu", weights_only=True)
        self.load_state(state)

    def load_state(self, state: dict) -> "LadcPyfunc":
        cfg = json.loads(state["config"])
        self.model = build_classifier(state)
        self.classes = list(cfg.get("classes") or range(cfg["num_classes"]))
        self.image_size = cfg.get("image_size")  # absent in models logged before it was stored
        return self

    def predict(self, context, model_input, params=None):
        output = (params or {}).get("output") or "class_id"
        if output not in OUTPUTS:
            raise invalid(f"params output={output!r} is not one of {', '.join(OUTPUTS)}")
        x = check_images(model_input, self.image_size)
        with torch.no_grad():
            logits = self.model(x)
        if output == "logits":
            return logits.numpy()
        if output == "probabilities":
            return torch.softmax(logits.double(), 1).numpy()
        ids = logits.argmax(1).numpy()
        if output == "name":
            return np.array([str(self.classes[i]) for i in ids], dtype=object)
        return ids


OUTPUTS = ("class_id", "logits", "name", "probabilities")


class InvalidInput(MlflowException):
    """An input error answered with HTTP 400 whose message stays short: the scoring server rewrites the message
    of any MlflowException raised by predict to "Failed to predict data '<the whole request>'. Error: ...",
    which would echo the input back; the first message set is kept."""

    @property
    def message(self):
        return self._message

    @message.setter
    def message(self, value):
        if "_message" not in self.__dict__:
            self._message = value


def invalid(message: str) -> MlflowException:
    """An input error the scoring server answers with HTTP 400 (not 500)."""
    return InvalidInput(message, error_code=INVALID_PARAMETER_VALUE)


def signature(ids: np.ndarray):
    """Params schema and output schema, but no input schema: with a tensor input schema the scoring server casts
    the JSON `inputs` to its dtype before predict runs (0.5 -> 0 for uint8), so predict could not tell pixels from
    garbage; without one it gets `np.array(inputs)` as sent, and `check_images` validates it (locally too)."""
    from mlflow.models import ModelSignature, infer_signature

    inferred = infer_signature(None, ids, params={"output": "class_id"})
    return ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params)


def log_classifier(model: ImageClassifier, backbone_name: str, classifier: str, classes: list,
                   example: torch.Tensor, name: str = "classifier", registered_model_name: str | None = None):
    """Log the classifier as an MLflow pyfunc model with input example and signature; returns model info."""
    example_np = example[:2].permute(0, 2, 3, 1).contiguous().cpu().numpy().astype(np.uint8)
    model = model.cpu().eval()
    with torch.no_grad():
        ids = model(torch.as_tensor(example_np).permute(0, 3, 1, 2)).argmax(1).numpy()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "classifier.pt"
        save_classifier(path, model, backbone_name, classifier, classes, image_size=list(example_np.shape[1:3]))
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"classifier": str(path)}, code_paths=[str(Path(__file__).resolve().parent)],
            input_example=example_np, signature=signature(ids), registered_model_name=registered_model_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", f"mlflow=={mlflow.__version__}"])
