"""Plots of the comparison harness (matplotlib, Agg backend, PNG files).

* ``pit_qq.png``: PIT histogram (top row, shared y axis, KS statistic on each panel) and PIT QQ
  plot against U(0,1) (bottom row), one column per estimator;
* ``zphot_zspec.png``: 2-D density of the point estimate (named on the y axis) vs the true
  redshift, with the one-to-one line, the eta boundaries |dz|/(1+z) = 0.15 and a colour bar;
* ``metrics_vs_redshift.png`` / ``metrics_vs_magnitude.png``: sigma_NMAD, eta, bias, CRPS,
  PCO and PIT KS per bin, one line per estimator, and the number of objects per bin;
* ``example_pdfs.png``: PDFs of the same objects (spread over redshift, inside the plotted
  range) from every estimator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

BINNED_METRICS = ("sigma_nmad", "eta", "bias_median", "crps", "pco", "pit_ks")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _overall(table, metric: str) -> dict:
    if table is None:
        return {}
    sub = table[(table.bin_type == "all") & (table.metric == metric)]
    return dict(zip(sub.estimator, sub.value))


def _pit_hist_quantiles(sketch, nbins: int, q: np.ndarray):
    """Density in ``nbins`` equal bins of [0, 1] and the quantiles ``q`` of the PIT values of a
    :class:`~rail.evaluation.deepz_sketch.PITSketch` (counts at the bin edges read off its
    reconstruction: exact where a fine bin holds <= 2 values, else within one fine bin)."""
    n = sketch.n + sketch.below + sketch.above
    if sketch.n == 0:
        return np.zeros(nbins), q
    edges = np.linspace(0.0, 1.0, nbins + 1)
    below = sketch.count_le(edges[1:-1], strict=True)  # values in [0, 1) below each inner edge
    cum = np.concatenate(([0], below, [sketch.n]))
    dens = np.diff(cum) / (n * np.diff(edges))
    rank = np.clip(np.round(q * (sketch.n - 1)).astype(np.int64), 0, sketch.n - 1)
    return dens, sketch.value_at(rank)


def pit_qq(summaries: dict, path: Path, nbins: int = 50, table=None) -> Path:
    """PIT histogram and QQ plot per estimator from its summary (``MetricGroups``: the PIT
    sketch of all scored rows) or, for arrays, a dict with ``pit``."""
    plt = _plt()
    labels = list(summaries)
    fig, axes = plt.subplots(2, len(labels), figsize=(3.6 * len(labels), 6.4), squeeze=False, sharey="row")
    q = np.linspace(0, 1, 101)
    ks = _overall(table, "pit_ks")
    for i, lab in enumerate(labels):
        sketch = _pit_sketch(summaries[lab])
        dens, quant = _pit_hist_quantiles(sketch, nbins, q)
        ax = axes[0, i]
        ax.stairs(dens, np.linspace(0, 1, nbins + 1), fill=True, color="C0", alpha=0.8)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_title(lab)
        ax.set_xlabel("PIT")
        if lab in ks and np.isfinite(ks[lab]):
            ax.text(0.5, 0.95, f"KS = {ks[lab]:.3f}", transform=ax.transAxes, ha="center", va="top", fontsize=9,
                    bbox=dict(boxstyle="round", fc="white", alpha=0.7))
        if i == 0:
            ax.set_ylabel("density")
        ax = axes[1, i]
        ax.plot(q, quant, color="C1")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlabel("uniform quantile")
        if i == 0:
            ax.set_ylabel("PIT quantile")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pit_sketch(summary):
    from .deepz_sketch import PITSketch

    if isinstance(summary, Mapping):  # per-object arrays
        sk = PITSketch()
        pit = np.asarray(summary["pit"], dtype=np.float64)
        sk.add(pit[np.isfinite(pit)])
        return sk
    return summary.all.pit


def _zz_hist(summary, zmin, zmax, nbins):
    if isinstance(summary, Mapping):  # per-object arrays
        ok = np.isfinite(summary["ztrue"]) & np.isfinite(summary["zphot"])
        return np.histogram2d(summary["ztrue"][ok], summary["zphot"][ok], bins=nbins,
                              range=[[zmin, zmax], [zmin, zmax]])[0]
    if summary.zz_hist is None or summary.zz_range != (float(zmin), float(zmax)) or summary.zz_bins != nbins:
        raise ValueError(f"the summary's zphot-ztrue histogram is {summary.zz_bins} bins over {summary.zz_range}, "
                         f"not {nbins} over ({zmin}, {zmax})")
    return summary.zz_hist


def zphot_zspec(summaries: dict, path: Path, zmin: float, zmax: float, nbins: int = 120,
                point_estimate: str = "zmode", z_label: str = "z true") -> Path:
    """zphot against ztrue, a 2-D histogram per estimator (from its summary's histogram, or
    per-object arrays ``ztrue``/``zphot``)."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    labels = list(summaries)
    fig, axes = plt.subplots(1, len(labels), figsize=(3.8 * len(labels) + 1.0, 3.8), squeeze=False, sharey=True,
                             layout="constrained")
    x = np.linspace(zmin, zmax, 50)
    counts = []
    for i, lab in enumerate(labels):
        counts.append(_zz_hist(summaries[lab], zmin, zmax, nbins))
    vmax = max([h.max() for h in counts] + [1.0])
    image = None
    for i, lab in enumerate(labels):
        ax = axes[0, i]
        h = np.ma.masked_equal(counts[i], 0)
        image = ax.imshow(h.T, origin="lower", extent=[zmin, zmax, zmin, zmax], aspect="auto", cmap="viridis",
                          norm=LogNorm(vmin=1, vmax=vmax), interpolation="nearest")
        ax.plot(x, x, "r--", lw=1)
        ax.plot(x, x + 0.15 * (1 + x), "r:", lw=1)
        ax.plot(x, x - 0.15 * (1 + x), "r:", lw=1)
        ax.set_xlim(zmin, zmax)
        ax.set_ylim(zmin, zmax)
        ax.set_title(lab)
        ax.set_xlabel(z_label)
        if i == 0:
            ax.set_ylabel(f"z phot ({point_estimate})")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), label="objects per cell", fraction=0.04, pad=0.02)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metrics_vs(table, bin_type: str, path: Path, xlabel: str) -> Path | None:
    plt = _plt()
    sub = table[table.bin_type == bin_type]
    if sub.empty:
        return None
    metrics = [m for m in BINNED_METRICS if m in set(sub.metric)]
    npanel = len(metrics) + 1  # + objects per bin
    ncol = 3
    nrow = int(np.ceil(npanel / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for k, m in enumerate(metrics):
        ax = axes.flat[k]
        for lab, grp in sub[sub.metric == m].groupby("estimator", sort=False):
            xc = 0.5 * (grp.bin_lo.to_numpy() + grp.bin_hi.to_numpy())
            ax.plot(xc, grp.value.to_numpy(), "o-", ms=3, label=lab)
        ax.set_title(m)
        ax.set_xlabel(xlabel)
    ax = axes.flat[len(metrics)]
    first = sub[sub.metric == metrics[0]] if metrics else sub
    for lab, grp in first.groupby("estimator", sort=False):
        lo, hi = grp.bin_lo.to_numpy(), grp.bin_hi.to_numpy()
        n = grp.n.to_numpy(dtype=float)
        ax.stairs(n, np.append(lo, hi[-1]) if lo.size else [0, 1], label=lab)
    ax.set_yscale("log")
    ax.set_title("objects per bin")
    ax.set_xlabel(xlabel)
    for k in range(npanel, nrow * ncol):
        axes.flat[k].axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def example_pdfs(result, path: Path, zmin: float | None = None, zmax: float | None = None,
                 z_label: str = "z") -> Path | None:
    plt = _plt()
    examples = result.example_pdfs
    idx = sorted({i for d in examples.values() for i in d})
    if not idx:
        return None
    ztrue = result.example_ztrue
    ncol = min(3, len(idx))
    nrow = int(np.ceil(len(idx) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for k, i in enumerate(idx):
        ax = axes.flat[k]
        for lab, d in examples.items():
            if i in d:
                ax.plot(result.zgrid, d[i], lw=1.2, label=lab)
        ax.axvline(ztrue[i], color="k", ls="--", lw=1)
        ax.set_title(f"object {i}, z = {ztrue[i]:.3f}", fontsize=9)
        ax.set_xlabel(z_label)
        if zmin is not None and zmax is not None:
            ax.set_xlim(zmin, zmax)
        if k % ncol == 0:
            ax.set_ylabel("p(z)")
    for k in range(len(idx), nrow * ncol):
        axes.flat[k].axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_all(result, outdir: Path, zmin: float, zmax: float, mag_label: str | None = None,
             z_label: str | None = None, point_estimate: str = "zmode") -> dict:
    """All plots of a :class:`~rail.evaluation.deepz_compare.CompareResult`; name -> path."""
    outdir = Path(outdir)
    zl = f"z true ({z_label})" if z_label else "z true"
    files = {
        "pit_qq": pit_qq(result.summaries, outdir / "pit_qq.png", table=result.table),
        "zphot_zspec": zphot_zspec(result.summaries, outdir / "zphot_zspec.png", zmin, zmax,
                                   point_estimate=point_estimate, z_label=zl),
        "metrics_vs_redshift": metrics_vs(result.table, "redshift", outdir / "metrics_vs_redshift.png", zl),
        "metrics_vs_magnitude": metrics_vs(result.table, "magnitude", outdir / "metrics_vs_magnitude.png",
                                           mag_label or "reference magnitude"),
        "example_pdfs": example_pdfs(result, outdir / "example_pdfs.png", zmin, zmax),
    }
    return {k: v for k, v in files.items() if v is not None}
