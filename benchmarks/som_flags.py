"""SOM flag benchmark (issue 5): embedding MDN next to FlexZBoost/BPZ, and flagged vs unflagged.

For each data set (DC2 from pz-rail-base; SDSS BOSS DR10 from ``../shared/data`` when present):

1. 10% of the training table (seeded) is held out as the *calibration* split. Every
   estimator is trained on the other 90%: the embedding MDN gets the whole table with
   ``val_column`` marking the calibration rows (early stopping + its SOM's per-cell
   statistics); FlexZBoost and BPZ (DC2 only: no SDSS filter curves) are trained on the 90%
   and run on the calibration split and the test table.
2. The MDN's own SOM flags come with its estimate; FlexZBoost's and BPZ's outputs are
   flagged by the separate stages (``DeepzSOMFlagInformer`` on the training 90% + the
   calibration split and the estimator's PDFs there; ``DeepzSOMFlagger`` on the test set),
   with the same SOM settings.
3. On the test table: overall metrics of every estimator, and sigma_NMAD, eta, PCO, bias
   of flagged vs unflagged objects (flag_ood, flag_underperforming, either), with
   bootstrap errors of the flagged-minus-unflagged differences.
4. A SOM plot per data set: per-cell training count and per-cell (calibration split)
   sigma_NMAD, eta, PCO for the MDN and FlexZBoost, flagged cells marked.

Writes ``benchmarks/results/som_flags_<data>.json``, ``.md`` and ``som_flags_<data>_som.png``;
qp files go to ``benchmarks/out/som_flags_<data>/``. The MDN's PDFs are written as
``qp.interp`` on a grid of spacing sigma/2 (registry setting; qp cannot evaluate 200-component
``qp.mixmod`` ensembles on a metric grid within memory).

    python benchmarks/som_flags.py                 # DC2 (+ BOSS if present)
    python benchmarks/som_flags.py --data dc2 --quick
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import git_commit, machine_info  # noqa: E402

FLAGS = ("flag_ood", "flag_underperforming", "flag_any")
SUBSET_METRICS = ("sigma_nmad", "eta", "pco", "bias")
OVERALL_METRICS = ("sigma_nmad_nomedian", "eta", "bias_median", "pco", "crps", "pit_ks", "rail_sigma_iqr", "rail_outlier_rate")
_uid = iter(range(10**6))


def _rows(table, mask):
    return {k: np.asarray(v)[mask] for k, v in table.items()}


def _log(msg):
    print(f"[som_flags {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stage(cls, **cfg):
    return cls.make_stage(name=f"somb_{cls.__name__}_{next(_uid)}", **cfg)


def _run(spec, ds, train, tables, outdir, quick, inform_extra=None):
    """Inform ``spec`` on ``train``; estimate each of ``tables`` -> qp files; returns paths, times."""
    from rail.core.data import TableHandle

    inform_cfg, est_cfg = spec.make_configs(ds, quick)
    inform_cfg.update(inform_extra or {})
    t0 = time.perf_counter()
    inf = _stage(spec.informer_class, model=str(outdir / f"{spec.key}_model.pkl"), **inform_cfg)
    inf.inform(TableHandle("input", data=train))
    times = {"inform_s": time.perf_counter() - t0}
    paths = {}
    for label, table in tables.items():
        t0 = time.perf_counter()
        out = outdir / f"{spec.key}_{label}.hdf5"
        est = _stage(spec.estimator_class, model=inf.get_handle("model"), output=str(out), **est_cfg)
        est.estimate(TableHandle("input", data=table))
        times[f"estimate_{label}_s"] = time.perf_counter() - t0
        paths[label] = out
    return inf, paths, times


def _flag_other(ds, key, train_fit, calib, calib_path, test, test_path, outdir, som_cfg):
    """Flags for another estimator's test PDFs through the separate stages."""
    import qp
    from rail.core.data import QPHandle, TableHandle

    from rail.estimation.algos.deepz_somflag import DeepzSOMFlagger, DeepzSOMFlagInformer

    phot = {k: v for k, v in ds.catalog_config().items() if k in ("bands", "err_bands", "mag_limits", "redshift_col",
                                                                 "zmin", "zmax", "hdf5_groupname")}
    finf = _stage(DeepzSOMFlagInformer, model=str(outdir / f"{key}_somflag_model.pkl"), **phot, **som_cfg)
    finf.inform(TableHandle("input", data=train_fit), TableHandle("truth", data=calib), qp.read(str(calib_path)))
    out = outdir / f"{key}_test_flagged.hdf5"
    flagger = _stage(DeepzSOMFlagger, model=finf.get_handle("model"), hdf5_groupname="", output=str(out))
    flagger.estimate(TableHandle("input", data=test), QPHandle("ensemble", path=str(test_path)))
    return finf, out


def _flag_arrays(path):
    import qp

    anc = qp.read(str(path)).ancil
    f = {k: np.asarray(anc[k]).astype(bool) for k in ("flag_ood", "flag_underperforming")}
    f["flag_any"] = f["flag_ood"] | f["flag_underperforming"]
    return f, np.asarray(anc["som_cell"])


def _subset_table(po, flags, n_boot=200, seed=0):
    """Metrics of flagged vs unflagged objects, with bootstrap errors of the difference."""
    from rail.evaluation import deepz_metrics as dm

    rng = np.random.default_rng(seed)

    def metrics(idx):
        zp, zt, pit = po["zphot"][idx], po["ztrue"][idx], po["pit"][idx]
        return {"sigma_nmad": dm.sigma_nmad_nomedian(zp, zt), "eta": dm.eta(zp, zt), "pco": dm.pco(pit),
                "bias": dm.bias_median(zp, zt)}  # the SOM paper's definitions, as rail.deepz.som

    out = {}
    for name, mask in flags.items():
        fl, ok = np.flatnonzero(mask), np.flatnonzero(~mask)
        row = {"n_flagged": int(fl.size), "n_unflagged": int(ok.size), "frac_flagged": float(mask.mean())}
        if fl.size == 0 or ok.size == 0:
            out[name] = row
            continue
        mf, mo = metrics(fl), metrics(ok)
        diffs = {m: [] for m in SUBSET_METRICS}
        for _ in range(n_boot):
            bf = metrics(rng.choice(fl, fl.size))
            bo = metrics(rng.choice(ok, ok.size))
            for m in SUBSET_METRICS:
                diffs[m].append(bf[m] - bo[m])
        for m in SUBSET_METRICS:
            err = float(np.std(diffs[m], ddof=1))
            d = mf[m] - mo[m]
            row[m] = {"flagged": mf[m], "unflagged": mo[m], "diff": d, "diff_err": err,
                      "significance": (abs(d) if m == "bias" else d) / err if err > 0 else None}
        out[name] = row
    return out


def _som_plot(models, shape, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("train_count", "training count (log10)"), ("sigma_nmad", "sigma_NMAD (calib.)"),
            ("eta", "eta (calib.)"), ("pco", "PCO (calib.)")]
    fig, axes = plt.subplots(len(models), len(cols), figsize=(4.2 * len(cols), 3.8 * len(models)), squeeze=False)
    for r, (label, fm) in enumerate(models.items()):
        tab = fm.cell_table()
        for c, (key, name) in enumerate(cols):
            ax = axes[r, c]
            v = np.asarray(tab[key], dtype=float)
            if key == "train_count":
                v = np.log10(np.maximum(v, 0.5))
            img = ax.imshow(v.reshape(shape), origin="lower", cmap="viridis" if key == "train_count" else "magma")
            fig.colorbar(img, ax=ax, fraction=0.046)
            yy, xx = np.divmod(np.arange(v.size), shape[1])
            u = tab["underperforming"]
            ax.scatter(xx[u], yy[u], marker="x", c="cyan", s=30, label="underperforming")
            o = tab["ood"]
            ax.scatter(xx[o], yy[o], marker="s", facecolors="none", edgecolors="red", s=40, label="OOD (count)")
            ax.set_title(f"{label}: {name}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].legend(loc="upper right", fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(data, quick, out_root, results):
    from rail.deepz import datasets
    from rail.deepz.som import SOMFlagModel
    from rail.evaluation import deepz_metrics as dm
    from rail.evaluation import deepz_registry as reg

    when = _dt.datetime.now().isoformat(timespec="seconds")
    mach = machine_info()
    _log(f"{data} on {mach['platform']}, {mach['cpu_count']} CPUs, torch threads {mach['torch_threads']}, "
         f"device {mach['device_name']}, {when}")
    ds = datasets.load(data)
    if quick:
        ds.train = datasets.subsample(ds.train, 3000, 0)
        ds.test = datasets.subsample(ds.test, 3000, 1)
    outdir = out_root / f"som_flags_{data}{'_quick' if quick else ''}"
    outdir.mkdir(parents=True, exist_ok=True)
    zcol = ds.redshift_col
    n = len(ds.train[zcol])
    calib_mask = np.zeros(n, dtype=bool)
    calib_mask[np.random.default_rng(0).permutation(n)[: int(round(0.1 * n))]] = True
    train_all = dict(ds.train, is_calib=calib_mask)
    train_fit, calib = _rows(ds.train, ~calib_mask), _rows(ds.train, calib_mask)
    _log(f"train {int((~calib_mask).sum())} / calibration {int(calib_mask.sum())} / test {len(ds.test[zcol])}")

    embed = reg.get("embed")
    inform_cfg, _ = embed.make_configs(ds, quick)
    som_cfg = {k: v for k, v in inform_cfg.items() if k.startswith("som_")}
    som_cfg.setdefault("som_features", ["colors"])
    estimates, times, flags, som_models = {}, {}, {}, {}

    _log("embed: inform (val_column = calibration split) + estimate test")
    inf, paths, times["embed"] = _run(embed, ds, train_all, {"test": ds.test}, outdir, quick,
                                      {"val_column": "is_calib"})
    estimates["embed"] = paths["test"]
    flags["embed"], _ = _flag_arrays(paths["test"])
    som_models["embed MDN"] = SOMFlagModel.from_dict(inf.model["som"])
    train_info = inf.model["train"]

    baselines = ["flexzboost"] + (["bpz"] if data == "dc2" else [])
    for key in baselines:
        spec = reg.get(key)
        _log(f"{key}: inform on the 90% + estimate calibration and test")
        _, paths, times[key] = _run(spec, ds, train_fit, {"calib": calib, "test": ds.test}, outdir, quick)
        estimates[key] = paths["test"]
        t0 = time.perf_counter()
        finf, flagged = _flag_other(ds, key, train_fit, calib, paths["calib"], ds.test, paths["test"], outdir, som_cfg)
        times[key]["som_flag_s"] = time.perf_counter() - t0
        flags[key], _ = _flag_arrays(flagged)
        som_models[key] = SOMFlagModel.from_dict(finf.model["som"])

    ztrue = np.asarray(ds.test[zcol], dtype=float)
    cfg = dm.MetricConfig.for_range(ds.zmin, ds.zmax)
    overall, subsets = {}, {}
    for key, path in estimates.items():
        _log(f"metrics {key}")
        po = dm.accumulate_estimate(path, ztrue, config=cfg, chunk_size=5000, label=key,
                                     per_object=True).per_object()
        allm = dm.summarize_group(po)
        overall[key] = {m: float(allm[m]) for m in OVERALL_METRICS}
        subsets[key] = _subset_table(po, flags[key])

    shape = tuple(som_models["embed MDN"].som.shape)
    results.mkdir(parents=True, exist_ok=True)
    png = _som_plot({k: v for k, v in som_models.items() if k in ("embed MDN", "flexzboost")}, shape,
                    results / f"som_flags_{data}{'_quick' if quick else ''}_som.png",
                    f"SOM {shape[0]}x{shape[1]} on {data} ({', '.join(som_cfg['som_features'])}); "
                    "x = underperforming cell, red square = OOD (few training objects)")
    report = {
        "benchmark": "som_flags",
        "date": when,
        "git_commit": git_commit(),
        "machine": mach,
        "data": data,
        "n_train_fit": int((~calib_mask).sum()),
        "n_calibration": int(calib_mask.sum()),
        "n_test": int(ztrue.size),
        "settings": {"quick": quick, "point_estimate": "zmode",
                     "som": dict(som_cfg, som_shape=list(shape)),  # the grid used (automatic unless set)
                     "embed_inform": {k: v for k, v in inform_cfg.items() if not isinstance(v, dict)},
                     "embed_best_epoch": train_info["best_epoch"], "embed_epochs_run": len(train_info["history"])},
        "overall": overall,
        "flagged_vs_unflagged": subsets,
        "som_summary": {k: v.summary() for k, v in som_models.items()},
        "times_s": times,
        "plot": str(png),
    }
    results.mkdir(parents=True, exist_ok=True)
    stem = f"som_flags_{data}{'_quick' if quick else ''}"
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    (results / f"{stem}.md").write_text(_markdown(report))
    print(_markdown(report), flush=True)
    return report


def _fmt(x, nd=4):
    return "nan" if x is None or x != x else f"{x:.{nd}g}"


def _markdown(r):
    m = r["machine"]
    lines = [f"# SOM flag benchmark: {r['data']}", "",
             f"{r['date']}, commit {r['git_commit']}; {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
             f"({m['torch_threads']} threads), device {m['device_name']}.",
             f"Train {r['n_train_fit']} / calibration {r['n_calibration']} / test {r['n_test']}; point estimate "
             f"zmode; SOM {r['settings']['som'].get('som_shape')} on {r['settings']['som'].get('som_features')}"
             f"{' QUICK settings (not representative)' if r['settings']['quick'] else ''}.", "",
             "## Overall (test)", "", "| estimator | " + " | ".join(OVERALL_METRICS) + " |",
             "|---" * (len(OVERALL_METRICS) + 1) + "|"]
    for k, v in r["overall"].items():
        lines.append(f"| {k} | " + " | ".join(_fmt(v[m]) for m in OVERALL_METRICS) + " |")
    lines += ["", "## Flagged vs unflagged (test); diff = flagged - unflagged +- bootstrap error", "",
              "| estimator | flag | n flagged (%) | sigma_NMAD flagged / unflagged | eta flagged / unflagged | "
              "PCO flagged / unflagged | bias flagged / unflagged | diff sigma (sig.) | diff eta (sig.) | diff PCO (sig.) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for k, rows in r["flagged_vs_unflagged"].items():
        for flag, row in rows.items():
            if "sigma_nmad" not in row:
                lines.append(f"| {k} | {flag} | {row['n_flagged']} ({100 * row['frac_flagged']:.1f}) | - | - | - | - | - | - | - |")
                continue
            cells = [f"{_fmt(row[m]['flagged'])} / {_fmt(row[m]['unflagged'])}" for m in SUBSET_METRICS]
            diffs = [f"{_fmt(row[m]['diff'], 3)} +- {_fmt(row[m]['diff_err'], 2)} ({_fmt(row[m]['significance'], 3)})"
                     for m in ("sigma_nmad", "eta", "pco")]
            lines.append(f"| {k} | {flag} | {row['n_flagged']} ({100 * row['frac_flagged']:.1f}) | "
                         + " | ".join(cells + diffs) + " |")
    lines += ["", "## SOMs", ""]
    for k, s in r["som_summary"].items():
        lines.append(f"- {k}: {s['n_cells']} cells, {s['ood_cells']} OOD (count) cells, {s['underperforming_cells']} "
                     f"underperforming cells; calibration global sigma_NMAD {_fmt(s['global']['sigma_nmad'])}, "
                     f"eta {_fmt(s['global']['eta'])}, PCO {_fmt(s['global']['pco'])}")
    lines += ["", "Wall times (s): " + "; ".join(f"{k}: " + ", ".join(f"{a} {b:.0f}" for a, b in t.items())
                                                for k, t in r["times_s"].items()), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dc2,boss")
    p.add_argument("--quick", action="store_true", help="3,000/3,000 objects, quick configs (smoke run)")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--results", default=str(HERE / "results"))
    a = p.parse_args(argv)
    for data in [d.strip() for d in a.data.split(",") if d.strip()]:
        if data == "boss":
            from rail.deepz.datasets import require_shared

            try:
                require_shared("sdss_boss_dr10")
            except FileNotFoundError as err:
                _log(f"skipping boss: {err}")
                continue
        run(data, a.quick, Path(a.out), Path(a.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
