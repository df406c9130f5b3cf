"""The shippable classifier as an MLflow pyfunc model: uint8 images [B, H, W, 3] (or [B, 3, H, W]) in,
class ids out (or logits with params={"output": "logits"})."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

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


def save_classifier(path: Path, model: ImageClassifier, backbone_name: str, classifier: str, classes: list) -> None:
    cfg = {"backbone": backbone_name, "classifier": classifier, "num_classes": len(classes), "classes": classes,
           "mean": (model.mean.flatten() / 255).tolist(), "std": (model.std.flatten() / 255).tolist()}
    torch.save({"model": model.state_dict(), "config": json.dumps(cfg)}, path)


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
        self.model = build_classifier(state)

    def predict(self, context, model_input, params=None):
        output = (params or {}).get("output", "class_id")
        if output not in OUTPUTS:
            raise invalid(f"params output={output!r} is not one of {', '.join(OUTPUTS)}")
        if hasattr(model_input, "to_numpy"):  # a DataFrame from the scoring server
            model_input = np.stack(model_input.iloc[:, 0].to_list())
        with torch.no_grad():
            logits = self.model(to_nchw(model_input))
        if output == "logits":
            return logits.numpy()
        return logits.argmax(1).numpy()


OUTPUTS = ("class_id", "logits")


def invalid(message: str):
    """An input error the scoring server answers with HTTP 400 (not 500)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def log_classifier(model: ImageClassifier, backbone_name: str, classifier: str, classes: list,
                   example: torch.Tensor, name: str = "classifier", registered_model_name: str | None = None):
    """Log the classifier as an MLflow pyfunc model with input example and signature; returns model info."""
    from mlflow.models import infer_signature

    example_np = example[:2].permute(0, 2, 3, 1).contiguous().cpu().numpy().astype(np.uint8)
    model = model.cpu().eval()
    with torch.no_grad():
        ids = model(torch.as_tensor(example_np).permute(0, 3, 1, 2)).argmax(1).numpy()
    signature = infer_signature(example_np, ids, params={"output": "class_id"})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "classifier.pt"
        save_classifier(path, model, backbone_name, classifier, classes)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"classifier": str(path)}, code_paths=[str(Path(__file__).resolve().parent)],
            input_example=example_np, signature=signature, registered_model_name=registered_model_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", f"mlflow=={mlflow.__version__}"])
