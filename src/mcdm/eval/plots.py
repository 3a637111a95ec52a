"""The evaluation's pictures: the frame grid (reference | ground truth and generated over time), the
frame strip (one clip's ground truth above its generated frames, at full size) and the long-term
curves (SSIM and identity over the frame index, Figure 5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mcdm.media.files import save_figure


def frame_grid(refs: np.ndarray, reals: list, fakes: list, clip_ids: list, fps: float, times: int, path: Path) -> Path:
    """Rows = clips; columns = reference | (ground truth, generated) at ``times`` instants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(refs), 1 + 2 * times
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows), squeeze=False)
    for r in range(rows):
        n = min(len(reals[r]), len(fakes[r]))
        picks = np.linspace(0, n - 1, times).round().astype(int)
        cells = [(refs[r], "reference")]
        for i in picks:
            cells += [(reals[r][i], f"GT {i / fps:.1f}s"), (fakes[r][i], f"gen {i / fps:.1f}s")]
        for c, (img, title) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_title(title, fontsize=6)
            ax.axis("off")
        # the clip's id beside its row (a title line above would run into the row above)
        axes[r, 0].text(-0.06, 0.5, clip_ids[r], rotation=90, transform=axes[r, 0].transAxes, ha="right",
                        va="center", fontsize=6)
    fig.tight_layout(pad=0.3)
    save_figure(fig, path, dpi=110)
    return path


def frame_strip(real: np.ndarray, fake: np.ndarray, path: Path, every: int = 3, count: int = 10, gap: int = 2) -> Path:
    """PNG of one clip at full size (no resampling): the top row holds ground-truth frames 0, ``every``,
    2 ``every``, ... (``count`` of them, fewer when the clip is short), the bottom row the generated
    frames at the same indices; ``gap`` white pixels between cells."""
    from PIL import Image

    n = min(len(real), len(fake))
    picks = np.arange(0, n, every)[:count]
    h, w = real.shape[1:3]
    canvas = np.full((2 * h + gap, len(picks) * (w + gap) - gap, 3), 255, np.uint8)
    for c, i in enumerate(picks):
        x = c * (w + gap)
        canvas[:h, x:x + w] = real[i]
        canvas[h + gap:, x:x + w] = fake[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def plot_long_term(curves: dict[str, pd.DataFrame], path: str | Path, title: str = "long-term generation") -> Path:
    """SSIM and identity distance against the frame index, one line per labelled curve (e.g. full, wo_fa)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_i) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, df in curves.items():
        ax_s.plot(df["frame"], df["ssim"], label=label)
        line = ax_i.plot(df["frame"], df["identity"], label=f"{label}: generated")[0]
        if "identity_gt" in df and len(curves) == 1:
            ax_i.plot(df["frame"], df["identity_gt"], color=line.get_color(), linestyle=":", label="ground truth")
    ax_i.axhline(0.0, color="grey", linestyle="--", linewidth=0.8, label="static reference (0, a bound)")
    ax_s.set(xlabel="frame", ylabel="SSIM vs ground truth", title="SSIM")
    ax_i.set(xlabel="frame", ylabel="dlib descriptor distance to reference", title="identity (lower is closer)")
    for ax in (ax_s, ax_i):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, Path(path, dpi=110))
    return Path(path)
