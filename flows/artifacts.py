"""What the flows attach to their runs as Prefect artifacts: the loss curve, images inline in markdown."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(metrics: Path, target: Path) -> Path | None:
    """The training loss per step, and its running mean over 1% of the steps, as a PNG; None before the
    first logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from blipdiff.infra.atomic import atomic_path

    if not metrics.is_file():
        return None
    frame = pd.read_parquet(metrics, columns=["step", "loss"])
    figure, axes = plt.subplots(figsize=(8, 4), dpi=100)
    axes.plot(frame["step"], frame["loss"], linewidth=0.6, alpha=0.4, label="loss")
    window = max(1, len(frame) // 100)
    axes.plot(frame["step"], frame["loss"].rolling(window, min_periods=1).mean(), label=f"mean of {window} steps")
    axes.set_xlabel("step")
    axes.set_ylabel("noise-prediction MSE")
    axes.legend()
    figure.tight_layout()
    with atomic_path(target) as temp:
        figure.savefig(temp, format="png")
    plt.close(figure)
    return target


def inline_png(path: Path, width: int) -> str:
    """The image as a markdown image the UI shows without a file server: a PNG data URI, ``width`` wide."""
    import base64
    import io

    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((width, width * image.height // image.width))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"![{path.name}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"
