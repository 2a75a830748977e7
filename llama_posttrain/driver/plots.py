"""Line charts of a pipeline run, with matplotlib: an optional dependency (`pip install -e '.[plots]'`).

line_chart("accuracy.png", "Task accuracy by stage", ["base", "R1 SFT", "R1 DPO"], {"greedy": [0.2, 0.5, 0.6]})
"""

from __future__ import annotations

HOW_TO_GET = "pip install -e '.[plots]' (or pip install matplotlib)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def line_chart(
    path,
    title: str,
    xlabels: list[str],
    series: dict[str, list[float | None]],
    xlabel: str = "",
    ylabel: str = "",
    errors: dict[str, list[tuple[float, float] | None]] | None = None,
) -> None:
    """One line per series over categorical x labels, saved as a PNG; a None value is a gap in its line.
    errors: per series, per point, the (low, high) of an interval drawn as an error bar (None: none)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    fig = Figure(figsize=(max(6.4, 0.6 * len(xlabels)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    xs = range(len(xlabels))
    for name, values in series.items():
        ys = [float("nan") if v is None else v for v in values]  # matplotlib breaks a line at NaN
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        bars = [(x, y, e) for x, y, e in zip(xs, ys, (errors or {}).get(name) or []) if e is not None]
        if bars:
            x, y, e = zip(*bars)
            below, above = [v - lo for v, (lo, _) in zip(y, e)], [hi - v for v, (_, hi) in zip(y, e)]
            ax.errorbar(x, y, yerr=[below, above], fmt="none", ecolor=line.get_color(), capsize=3, alpha=0.7)
    ax.set_xticks(xs, xlabels, rotation=45 if len(xlabels) > 7 else 0, ha="right" if len(xlabels) > 7 else "center")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
