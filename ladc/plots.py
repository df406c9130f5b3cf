"""Matplotlib figures logged as MLflow artifacts (headless Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_figure(cm, classes, title: str = "confusion matrix (row-normalised, %)"):
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None) * 100
    C = len(classes)
    size = min(4 + 0.45 * C, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if C <= 20:
        ax.set_xticks(range(C), classes, rotation=90)
        ax.set_yticks(range(C), classes)
        for i in range(C):
            for j in range(C):
                ax.text(j, i, f"{norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 50 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (classes by training count, largest first)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def per_class_figure(per_class: dict, counts, classes, title: str = "per-class accuracy"):
    """Bars of per-class accuracy for each split, with the training count on a log axis."""
    C = len(classes)
    fig, ax = plt.subplots(figsize=(min(6 + 0.3 * C, 24), 4))
    x = np.arange(C)
    width = 0.8 / max(len(per_class), 1)
    for i, (split, acc) in enumerate(per_class.items()):
        ax.bar(x + i * width, np.asarray(acc), width, label=split)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(x + 0.4 - width / 2, np.asarray(counts), "k.-", label="train count")
    ax2.set_yscale("log")
    ax2.set_ylabel("training images")
    if C <= 30:
        ax.set_xticks(x + 0.4 - width / 2, classes, rotation=60, ha="right")
    ax.legend(loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_figure(fig, artifact_file: str) -> None:
    """Log a figure to the active MLflow run and free it."""
    import mlflow

    try:
        mlflow.log_figure(fig, artifact_file)
    finally:
        plt.close(fig)


def log_accuracy_report(reports: dict, classes, counts, plots: bool = True) -> None:
    """Per-class accuracy table (results/per_class_accuracy.csv) for each evaluated split and, with
    `plots`, the test confusion matrix and the per-class accuracy figure."""
    import tempfile
    from pathlib import Path

    import mlflow
    import pandas as pd

    if not reports:
        return
    counts = list(counts)
    table = pd.DataFrame({"class": classes, "train_count": counts})
    for split, rep in reports.items():
        table[f"{split}_acc"] = rep["per_class"].tolist()
    with tempfile.TemporaryDirectory() as d:
        table.round(2).to_csv(Path(d) / "per_class_accuracy.csv", index=False)
        mlflow.log_artifact(str(Path(d) / "per_class_accuracy.csv"), "results")
    if plots and "test" in reports:
        log_figure(confusion_figure(reports["test"]["confusion"], classes, "test confusion matrix (row-normalised, %)"),
                   "plots/confusion_test.png")
        log_figure(per_class_figure({s: r["per_class"] for s, r in reports.items()}, counts, classes),
                   "plots/per_class_accuracy.png")


def learning_curves_figure(history: dict):
    """Training loss and validation / test top-1 against the epoch: {metric: [(step, value), ...]}."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax in (("train_loss", a), ("val_top1", b), ("test_top1", b), ("train_acc", b)):
        pts = sorted(history.get(key, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, marker="." if len(pts) < 30 else None)
    a.set(xlabel="epoch", ylabel="loss", title="training loss")
    b.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    b.legend()
    fig.tight_layout()
    return fig
