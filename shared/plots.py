"""Small plotting helpers the chapters share: one look, heatmaps, and coloured token views."""

from __future__ import annotations

import html
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

# A light palette for token backgrounds: neighbouring tokens always get different colours.
TOKEN_COLORS = ("#fde2a7", "#b9e4c9", "#c6d8f7", "#f7c6d9", "#d9c6f7", "#c6f2f7")


def use_book_style() -> None:
    """One consistent, readable look for every figure in the book."""
    plt.rcParams.update({
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": 100,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 10,
    })


def heatmap(ax, matrix, row_labels: Sequence[str], col_labels: Sequence[str], *,
            annotate: bool = True, fmt: str = "{:.2f}", cmap: str = "viridis"):
    """Draw `matrix` (rows x cols) on `ax` with labelled axes and, optionally, each value written in."""
    values = np.asarray(matrix, dtype=float)
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), labels=row_labels)
    ax.grid(False)
    if annotate:
        middle = (values.max() + values.min()) / 2
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                colour = "black" if values[i, j] > middle else "white"
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8, color=colour)
    return image


def tokens_html(pieces: Sequence[str]) -> str:
    """HTML that shows each text piece on its own coloured background, so token boundaries are visible.

    Whitespace is kept (spaces as-is, newlines as a visible return mark followed by a line break).
    """
    spans = []
    for i, piece in enumerate(pieces):
        shown = html.escape(piece).replace("\n", "\u21b5<br>")
        colour = TOKEN_COLORS[i % len(TOKEN_COLORS)]
        spans.append(f'<span style="background:{colour};color:black;white-space:pre-wrap">{shown}</span>')
    return '<div style="font-family:monospace;line-height:1.8">' + "".join(spans) + "</div>"
