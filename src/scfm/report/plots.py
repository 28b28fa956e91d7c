"""Matplotlib figures for the report, returned as PNG bytes so the HTML can inline them."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

_DPI = 90
_POINT_LIMIT = 50_000  # beyond this a scatter only gets slower, not more informative


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _draw_order(n: int, seed: int) -> np.ndarray:
    # a random draw order keeps one category from painting over all others
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    return order[:_POINT_LIMIT]


def _scatter(ax, coords: np.ndarray, values: pd.Series, title: str, seed: int) -> None:
    order = _draw_order(len(coords), seed)
    size = max(1.0, min(12.0, 30_000 / max(len(coords), 1)))
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object or values.dtype == bool:
        categories = pd.Categorical(values.astype(str))
        names = list(categories.categories)
        cmap = _pyplot().get_cmap("tab20" if len(names) > 10 else "tab10")
        colours = np.array([cmap(i % cmap.N) for i in range(len(names))])
        ax.scatter(*coords[order].T, c=colours[categories.codes[order]], s=size, linewidths=0)
        if len(names) <= 30:
            from matplotlib.lines import Line2D

            handles = [
                Line2D([], [], marker="o", linestyle="", color=colours[i], label=name)
                for i, name in enumerate(names)
            ]
            ax.legend(handles=handles, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        numbers = values.to_numpy(dtype=float)
        points = ax.scatter(*coords[order].T, c=numbers[order], s=size, linewidths=0, cmap="viridis")
        ax.figure.colorbar(points, ax=ax, fraction=0.046, pad=0.02)


def umap_pair_png(
    coords_by_embedding: dict[str, np.ndarray], values: pd.Series, colour_name: str, *, seed: int = 0
) -> bytes:
    """One row of UMAPs, one panel per embedding (scfm | PCA), coloured by the same values."""
    plt = _pyplot()
    n = len(coords_by_embedding)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.6), squeeze=False)
    for ax, (name, coords) in zip(axes[0], coords_by_embedding.items()):
        _scatter(ax, coords, values, f"{name} — {colour_name}", seed)
    fig.tight_layout()
    return figure_png(fig)


def confusion_png(matrix: np.ndarray, truth_classes: list[str], predicted_classes: list[str]) -> bytes:
    """Row-normalised confusion matrix (rows = known label, columns = scfm_cell_type), counts written in."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = 0.55 * max(len(truth_classes), len(predicted_classes)) + 2.5
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(predicted_classes)), predicted_classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(truth_classes)), truth_classes, fontsize=8)
    ax.set_xlabel("scfm_cell_type")
    ax.set_ylabel("known label")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if matrix[i, j]:
                colour = "white" if fraction[i, j] > 0.6 else "black"
                ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="fraction of row")
    fig.tight_layout()
    return figure_png(fig)


def curves_png(histories: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """Training curves: one panel per metric, value against step."""
    plt = _pyplot()
    n = len(histories)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (name, points) in zip(axes.flat, histories.items()):
        steps, values = zip(*points) if points else ((), ())
        ax.plot(steps, values, marker="." if len(points) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)
