"""Pictures people would rather look at than read: accuracy and loss curves."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves_figure(history: list[dict], title: str):
    """history: per-epoch dicts with 'step' and metric names -> a 2-panel figure."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history]
    for key, label in (("train/acc", "train"), ("val/acc", "validation")):
        ys = [h.get(key) for h in history]
        if any(y is not None for y in ys):
            ax_acc.plot(steps, ys, marker="o", ms=3, label=label)
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        ys = [h.get(key) for h in history]
        if any(y is not None for y in ys):
            ax_loss.plot(steps, ys, marker="o", ms=3, label=label)
    ax_acc.set_xlabel("epoch"); ax_acc.set_ylabel("top-1 accuracy"); ax_acc.legend(); ax_acc.grid(alpha=.3)
    ax_loss.set_xlabel("epoch"); ax_loss.set_ylabel("loss"); ax_loss.legend(); ax_loss.grid(alpha=.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_curves(run_id: str, history: list[dict], title: str, name: str = "accuracy_curves.png") -> None:
    import mlflow
    if not history:
        return
    fig = curves_figure(history, title)
    mlflow.MlflowClient().log_figure(run_id, fig, name)
    plt.close(fig)
