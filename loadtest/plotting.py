"""Figures for the benchmarks. matplotlib is optional (the `bench` extra): without it, no figure."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def new_figure(**subplots: Any) -> tuple[Any, Any] | None:
    """``plt.subplots(**subplots)`` on the file-only backend, or None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing; skipping the plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    return plt.subplots(**subplots)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"plot saved to {path}", file=sys.stderr)
