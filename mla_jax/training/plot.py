"""The loss curve PNG (and the expert-load imbalance beside it, for MoE models). Needs matplotlib,
the optional dependency `mla-jax[plot]`; without it `plot_metrics` says so and writes nothing."""

from __future__ import annotations

import os
import tempfile


def plot_metrics(records: list[dict], path: str | os.PathLike) -> str | None:
    """Writes the PNG atomically and returns its path, or None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curve not drawn: matplotlib is not installed (pip install 'mla-jax[plot]')")
        return None
    path = os.fspath(path)
    steps = [r["step"] for r in records]
    imbalance = [r.get("expert_load_max_over_mean") for r in records]
    has_moe = any(v is not None for v in imbalance)
    fig, axes = plt.subplots(1, 2 if has_moe else 1, figsize=(11 if has_moe else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in records], label="cross-entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if has_moe:
        ax2 = axes[0][1]
        ax2.plot(steps, [float("nan") if v is None else v for v in imbalance], color="tab:orange")
        ax2.axhline(1.0, color="gray", linestyle=":")
        ax2.set_xlabel("step")
        ax2.set_ylabel("max / mean tokens per expert")
        ax2.set_title("expert load imbalance (mean over MoE layers)")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
