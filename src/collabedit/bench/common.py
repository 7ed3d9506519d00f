"""Pieces shared by the bench experiments: configs, request forms, plotting setup."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from collabedit.bench.lab import CF_KEYS, ZSRE_KEYS  # noqa: E402

Form = Literal["counterfact", "zsre"]


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    form: Form = "counterfact"

    @property
    def keys(self) -> tuple[str, ...]:
        return CF_KEYS if self.form == "counterfact" else ZSRE_KEYS

    @property
    def score_key(self) -> str:
        return "Score" if self.form == "counterfact" else "zsRE_Score"


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_lines(ax, rows: list[dict], x: str, y: str, log_x: bool = True) -> None:
    """One line per method of rows {x: .., "method": .., y: ..}; ticks at the measured x."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        pts = [r for r in rows if r["method"] == m]
        if m == "global":  # hollow and large: CollabEdit usually lies exactly on top of it
            kw = {"marker": "o", "markersize": 10, "fillstyle": "none", "linestyle": "-"}
        elif m == "collabedit":
            kw = {"marker": "o", "markersize": 4, "linestyle": "-"}
        else:
            kw = {"marker": "s", "markersize": 4, "linestyle": "--"}
        ax.plot([r[x] for r in pts], [r[y] for r in pts], label=m, **kw)
    if log_x:
        ax.set_xscale("log")
    xs = sorted({r[x] for r in rows})
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.minorticks_off()
    ax.set_ylim(0, 101)
    ax.set_ylabel(y)
    ax.legend(fontsize=8)
