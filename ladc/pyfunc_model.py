"""Models-from-code entry point of the logged classifier (see ladc.serving)."""

import mlflow

from ladc.serving import LadcPyfunc

mlflow.models.set_model(LadcPyfunc())
