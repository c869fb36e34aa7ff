"""Plots and small interactive explorers for the labs (matplotlib + ipywidgets).

Every function also works headless (papermill, CI): explorers draw a static figure next
to their widgets, so an executed notebook always contains an image.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


# ----------------------------------------------------------------------------------------
# Attention heatmaps


def plot_attention(
    weights, tokens_q: Sequence[str], tokens_k: Sequence[str] | None = None,
    ax: Axes | None = None, title: str | None = None, colorbar: bool = True,
) -> Axes:
    """Heatmap of one (T_q, T_k) attention matrix: rows are queries, columns keys."""
    w = _numpy(weights)
    if w.ndim != 2:
        raise ValueError(f"plot_attention expects a (T_q, T_k) matrix, got shape {w.shape}")
    tokens_k = tokens_q if tokens_k is None else tokens_k
    if ax is None:
        size = max(3.0, 0.32 * max(w.shape) + 1.5)
        _, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-9), aspect="auto")
    ax.set_xticks(range(len(tokens_k)), labels=list(tokens_k), rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens_q)), labels=list(tokens_q), fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_heads(weights, tokens: Sequence[str], title: str | None = None, cols: int = 4) -> Figure:
    """Small multiples of every head: weights (H, T, T) -> a grid of heatmaps."""
    w = _numpy(weights)
    H = w.shape[0]
    rows = -(-H // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(w[h], cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks(range(len(tokens)), labels=list(tokens) if len(tokens) <= 16 else [""] * len(tokens),
                      fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_explorer(sentences: list[list[str]], attentions, sentence: int = 0, layer: int = 0) -> None:
    """Browse a model's attention: pick a sentence, a layer and a head; the heatmap redraws.

    Below the controls it also draws every head of `layer` for `sentence` as a static grid.

    Args:
        sentences: tokens of each sentence (padding removed or not; rows/columns follow them).
        attentions: attentions[s] = tuple over layers of (1, H, T, T) tensors, as Hugging Face
            models return with output_attentions=True.
        sentence, layer: what to show first.
    """
    import ipywidgets as widgets
    from IPython.display import display

    n_layers = len(attentions[0])
    n_heads = attentions[0][0].shape[1]

    def matrix(s: int, l: int, h: int) -> np.ndarray:
        T = len(sentences[s])
        return _numpy(attentions[s][l][0, h])[:T, :T]

    choose = widgets.Dropdown(
        options=[(" ".join(toks)[:70], i) for i, toks in enumerate(sentences)], value=sentence,
        description="sentence", layout=widgets.Layout(width="95%"))
    layer_slider = widgets.IntSlider(value=layer, min=0, max=n_layers - 1, description="layer")
    head_slider = widgets.IntSlider(value=0, min=0, max=n_heads - 1, description="head")
    out = widgets.Output()

    def redraw(*_):
        s, l, h = choose.value, layer_slider.value, head_slider.value
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(6.5, 5.5))
            plot_attention(matrix(s, l, h), sentences[s], ax=ax, title=f"layer {l}, head {h}")
            fig.tight_layout()
            plt.show()

    for control in (choose, layer_slider, head_slider):
        control.observe(redraw, names="value")
    box = widgets.VBox([choose, widgets.HBox([layer_slider, head_slider]), out])
    display(box)
    redraw()

    # The static companion: every head of the chosen layer for the chosen sentence. It shows
    # in a live notebook too, and it is what a headless run (papermill, CI) keeps as an image.
    weights = np.stack([matrix(sentence, layer, h) for h in range(n_heads)])
    plot_heads(weights, sentences[sentence], title=f"all heads of layer {layer}")
    plt.show()


# ----------------------------------------------------------------------------------------
# Cost curves


def plot_scaling(lengths: Sequence[int], seconds: Sequence[float], bytes_: Sequence[float],
                 predicted_bytes: Sequence[float] | None = None,
                 compare: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                 title: str | None = None) -> Figure:
    """Two log-log panels, time and peak memory vs sequence length, each with a T^2 guide.

    predicted_bytes: a computed memory curve drawn on the memory panel (e.g. one score matrix).
    compare: {label: (seconds, bytes_)} further implementations measured at the same lengths.
    """
    n = np.asarray(lengths, dtype=float)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, y, label in ((ax_t, np.asarray(seconds, dtype=float), "measured time"),
                         (ax_m, np.asarray(bytes_, dtype=float) / 2**20, "measured peak")):
        ax.loglog(n, y, "o-", label=label)
        # the T^2 guide goes through the longest measurement, where fixed overheads matter least
        ax.loglog(n, y[-1] * (n / n[-1]) ** 2, "k--", alpha=0.6, label=r"$\propto T^2$")
    if predicted_bytes is not None:
        ax_m.loglog(n, np.asarray(predicted_bytes, dtype=float) / 2**20, "s:", label="one score matrix")
    for label, (secs, nbytes) in (compare or {}).items():
        ax_t.loglog(n, np.asarray(secs, dtype=float), "^-", label=label)
        ax_m.loglog(n, np.maximum(np.asarray(nbytes, dtype=float), 1.0) / 2**20, "^-", label=label)
    for ax, name, ylabel in ((ax_t, "time", "time (s)"), (ax_m, "memory", "peak memory (MiB)")):
        ax.set_xticks(n, labels=[f"{int(v)}" for v in n])  # after the last loglog, which resets ticks
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=name, xlabel="sequence length T", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
