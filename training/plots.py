"""The run's figures: ``curves.png`` (loss/accuracy per epoch) and ``attention.png`` (masks on val images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from torch import nn  # noqa: E402

from models.checkpoint import Preprocessing, atomic_write  # noqa: E402


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def curves(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        acc_ax.plot(epochs, [row[f"{split}_acc"] for row in history], marker="o", label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def stage_maps(maps: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The last attention module of each stage (``layer2.2.cbam`` for layer2; ``bam1`` is its own stage)."""
    last: dict[str, torch.Tensor] = {}
    for name, attention_map in maps.items():
        last[name.split(".")[0]] = (name, attention_map.spatial)
    return {name: spatial for name, spatial in last.values()}


def caption(label: int, predicted: int, class_names: list[str] | None) -> str:
    """``true → predicted`` by class name (index when no names)."""
    def name(i: int) -> str:
        return class_names[i] if class_names else str(i)

    return f"{name(label)} → {name(predicted)}"


@torch.no_grad()
def attention_grid(model: nn.Module, dataset, preprocessing: Preprocessing, path: Path, *,
                   device: torch.device | str = "cpu", count: int = 6, class_names: list[str] | None = None) -> None:
    """Rows: ``count`` val images (titled true → predicted class); columns: the image, then each stage's
    spatial mask over it, on one 0-1 colour scale shown by the colour bar."""
    picks = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().long().tolist()
    samples = [dataset[i] for i in picks]
    images = torch.stack([s[0] for s in samples]).to(device)
    logits, maps = model.eval().forward_with_attention(images)
    stages = stage_maps(maps)
    mean = torch.tensor(preprocessing.mean, device=device)[:, None, None]
    std = torch.tensor(preprocessing.std, device=device)[:, None, None]
    shown = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    fig, axes = plt.subplots(len(picks), 1 + len(stages), figsize=(2 * (1 + len(stages)) + 0.6, 2 * len(picks)),
                             squeeze=False)
    for row, (image, sample) in enumerate(zip(shown, samples, strict=True)):
        cmap = "gray" if image.shape[-1] == 1 else None
        axes[row, 0].imshow(image.squeeze(-1) if cmap else image, cmap=cmap)
        label, predicted = int(sample[1]), logits[row].argmax().item()
        axes[row, 0].set_title(caption(label, predicted, class_names), fontsize=8,
                               color="black" if label == predicted else "red")
        for col, (name, spatial) in enumerate(stages.items(), start=1):
            mask = F.interpolate(spatial[row:row + 1].float(), size=image.shape[:2], mode="nearest")[0, 0].cpu().numpy()
            axes[row, col].imshow(image.squeeze(-1) if cmap else image, cmap=cmap)
            axes[row, col].imshow(mask, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[row, col].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if stages:
        scale = ScalarMappable(norm=Normalize(0, 1), cmap="jet")
        fig.colorbar(scale, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="spatial attention (0-1)")
    save_figure(fig, path)


def confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, *, title: str = "") -> None:
    """Rows: true class, columns: predicted; colour = share of the row, numbers = image counts (up to 30 classes)."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(class_names)
    side = min(max(4.0, 0.45 * n + 2), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
        for (i, j), value in np.ndenumerate(counts):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    save_figure(fig, path)
