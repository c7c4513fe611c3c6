"""Evaluation: per-task ACC, AUC (MedMNIST conventions), confusion matrices, checkpoint selection score."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score

from .data import TaskData, task_tensor


@torch.no_grad()
def predict(model, td: TaskData, t: int, split: str, device="cpu", batch_size: int = 512) -> np.ndarray:
    """Logits of task head t for every image of the split (the model runs with task index t)."""
    model.eval()
    x_all = task_tensor(td, split)
    outs = []
    for s in range(0, len(x_all), batch_size):
        x = x_all[s:s + batch_size].to(device)
        task = torch.full((len(x),), t, dtype=torch.long, device=device)
        outs.append(model.logits(model(x, task), t).float().cpu())
    return torch.cat(outs).numpy()


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUC of the positive-class probability; multi-class: macro one-vs-rest AUC (as MedMNIST)."""
    try:
        if probs.shape[1] == 2:
            return float(roc_auc_score(labels, probs[:, 1]))
        return float(roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))
    except ValueError:
        return float("nan")


def task_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    pred = logits.argmax(1)
    return {
        "acc": float((pred == labels).mean()),
        "auc": auc(labels, probs),
        "confusion": confusion_matrix(labels, pred, labels=list(range(logits.shape[1]))).tolist(),
        "n": int(len(labels)),
    }


def evaluate(model, tasks: list[TaskData], split: str, device="cpu", batch_size: int = 512) -> dict:
    return {
        td.spec.id: task_metrics(td.labels[split], predict(model, td, t, split, device, batch_size))
        for t, td in enumerate(tasks)
    }


def selection_score(val: dict) -> float:
    """Checkpoint selection on val: mean over tasks of (ACC + AUC) / 2 (AUC steadies the small val sets)."""
    vals = [(m["acc"] + (m["auc"] if m["auc"] == m["auc"] else 0.5)) / 2 for m in val.values()]
    return float(np.mean(vals))
