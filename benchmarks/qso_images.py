"""Image CNN + GMM ensemble vs its catalog-only ablation on SDSS high-z quasar stamps.

Data: ``../shared/data/sdss_qso_stamps/sdss_qso_ugriz32.h5`` (groups train/val/test: ugriz
32x32 stamps, pixel units as stored upstream, spectroscopic ``redshift`` 2.75-7.04) joined to
``TrainingDatasets.csv`` (ugriz magnitudes umag..zmag, errors e_umag..e_zmag; redshift ``Z``,
not ``z``). The CSV's specObjId went through float64 text, so the join matches the h5
``objid`` to the nearest CSV id (relative difference < 1e-9) with the same redshift (1e-5).
Training uses train, early stopping uses val (``val_column``), metrics are on test.

For each of ``use_images`` True / False the same DeepzCNN stage is trained (same seeds,
members, epochs) and evaluated: sigma_NMAD and outlier fraction eta (|dz|/(1+z) > 0.15) of
the PDF median, mean CRPS of the mixture, KS distance of the PITs from uniform, and
estimation throughput (objects, i.e. 5-band stamps, per second, inference only) on the
``--device``; and RAIL's FlexZBoost on the same ugriz catalogue photometry and splits.

With ``--pool`` a third CNN row trains PICZL's ensemble recipe (``ensemble='pool'``: a pool of
``--pool-size`` members varied by loss CRPS/NLL x components ``--pool-components`` x learning
rate ``--pool-lrs``, ``--select`` of them chosen by validation outlier rate and weighted to
minimise the validation CRPS) beside the plain seed ensemble of ``--members`` members;
``--no-catalog`` skips the catalog-only row. ``--augment-errors`` adds a row of the seed ensemble
trained with error-aware augmentation of its catalog branch (``augment_errors=True``: the ugriz
photometry redrawn within its errors each epoch; the stamps as measured).

Writes ``benchmarks/results/qso_images.{md,json}`` (or ``--out``) with machine, date, commit, load and settings.

    python benchmarks/qso_images.py                 # --epochs 30 --members 2
    python benchmarks/qso_images.py --epochs 40 --members 3 --patience 10 --catalog-epochs 300  # latest results
    python benchmarks/qso_images.py --epochs 5      # smoke run (says so in the output)
    python benchmarks/qso_images.py --epochs 25 --members 3 --pool --select 3 --no-catalog --no-flexzboost \
        --threads 1 --out benchmarks/results/qso_images_pool    # pool vs seed ensemble
    python benchmarks/qso_images.py --epochs 8 --members 2 --augment-errors --no-catalog --no-flexzboost \
        --threads 1 --out benchmarks/results/qso_images_augment_smoke    # augmentation on vs off, smoke
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BANDS = ["umag", "gmag", "rmag", "imag", "zmag"]
ERRS = ["e_umag", "e_gmag", "e_rmag", "e_imag", "e_zmag"]


def load_qso():
    import h5py
    import pandas as pd

    from rail.deepz.datasets import require_shared

    base = require_shared("sdss_qso_stamps")
    cat = pd.read_csv(base / "TrainingDatasets.csv")
    ids = cat["specObjId"].to_numpy(np.float64)
    order = np.argsort(ids)
    ids_sorted = ids[order]
    out, n_lost = {}, {}
    with h5py.File(base / "sdss_qso_ugriz32.h5", "r") as f:
        for group in ("train", "val", "test"):
            g = f[group]
            oid = g["objid"][:].astype(np.float64)
            zspec = g["redshift"][:]
            pos = np.clip(np.searchsorted(ids_sorted, oid), 1, len(ids_sorted) - 1)
            # nearest of the two neighbours
            left, right = ids_sorted[pos - 1], ids_sorted[pos]
            pos = np.where(np.abs(oid - left) <= np.abs(oid - right), pos - 1, pos)
            row = order[pos]
            ok = (np.abs(ids[row] - oid) <= 1e-9 * oid) & (np.abs(cat["Z"].to_numpy()[row] - zspec) < 1e-5)
            n_lost[group] = int((~ok).sum())
            table = {b: cat[b].to_numpy(np.float64)[row[ok]] for b in BANDS + ERRS}
            table["redshift"] = zspec[ok]
            table["images"] = g["images"][:][ok].astype(np.float32)
            table["id"] = np.flatnonzero(ok)
            out[group] = table
    return out, n_lost


def eta_of(zp, z):
    from rail.deepz.pointmetrics import eta

    return eta(np.ravel(zp), z)


def metrics(ens, z, limits=(2.5, 7.5)):
    """The papers' metrics of any qp ensemble against the true redshifts z."""
    from rail.evaluation.deepz_metrics import bias_median as bias
    from rail.evaluation.deepz_metrics import crps, eta, pit_metrics, pit_values
    from rail.evaluation.deepz_metrics import sigma_nmad_nomedian as sigma_nmad  # PICZL's 1.4826 median(|dz|)

    zp = np.ravel(ens.ancil["zmedian"]) if ens.ancil is not None and "zmedian" in ens.ancil else np.ravel(ens.median())
    pit = pit_metrics(pit_values(ens, z))
    return dict(sigma_nmad=sigma_nmad(zp, z), eta=eta(zp, z), crps=float(np.mean(crps(ens, z, limits=limits))),
                pit_ks=float(pit["pit_ks"]), bias=bias(zp, z))


def flexzboost_row(train, test, common):
    """FlexZBoost (RAIL's baseline) on the same ugriz catalogue photometry and splits, with
    the comparison registry's configuration (as in benchmarks/accuracy.py), seed 0."""
    from rail.deepz.datasets import SDSS_WAVELENGTHS, Dataset
    from rail.evaluation.deepz_registry import get

    catalog = {k: v for k, v in train.items() if k not in ("images", "is_val")}
    ds = Dataset(name="sdss_qso", train=catalog, test={k: v for k, v in test.items() if k != "images"},
                 bands=BANDS, err_bands=ERRS, mag_limits=common["mag_limits"], redshift_col=common["redshift_col"],
                 zmin=common["zmin"], zmax=common["zmax"], wavelengths=list(SDSS_WAVELENGTHS), ref_band="imag",
                 extra={"id_col": "id"})
    spec = get("flexzboost")
    inform, estimate = spec.make_configs(ds)
    inform.update(seed=0)
    t0 = time.perf_counter()
    inf = spec.informer_class.make_stage(name="qso_fzb_inf", **inform)
    inf.inform(ds.train)
    t_train = time.perf_counter() - t0
    est = spec.estimator_class.make_stage(name="qso_fzb_est", model=inf.get_handle("model"), output_mode="return",
                                          **estimate)
    t0 = time.perf_counter()
    ens = est.estimate(ds.test).data
    t_est = time.perf_counter() - t0
    row = metrics(ens, test["redshift"])
    row.update(train_s=round(t_train, 1), estimate_s=round(t_est, 2),
               objects_per_s=round(len(test["redshift"]) / t_est, 1))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--catalog-epochs", type=int, default=None,
                    help="epoch cap of the catalog-only model (default: --epochs); it is cheap, so it can be "
                         "given enough epochs for early stopping to end it")
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--components", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss", default="crps", help="'crps', 'nll' or 'both' (alternating over members)")
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'auto' (training and estimation)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-flexzboost", action="store_true", help="skip the FlexZBoost row")
    ap.add_argument("--no-catalog", action="store_true", help="skip the catalog-only CNN row")
    ap.add_argument("--pool", action="store_true", help="add a row with PICZL's pool recipe (ensemble='pool')")
    ap.add_argument("--pool-components", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--pool-lrs", type=float, nargs="+", default=[1e-3, 3e-4])
    ap.add_argument("--pool-size", type=int, default=0, help="0 = one member per combination (2 losses x ...)")
    ap.add_argument("--select", type=int, default=3, help="members kept from the pool")
    ap.add_argument("--pool-weighting", default="val_crps", help="'val_crps' or 'equal' (option pool_weighting)")
    ap.add_argument("--no-seed-row", action="store_true", help="with --pool: skip the seed-ensemble row")
    ap.add_argument("--augment-errors", action="store_true",
                    help="add the seed ensemble trained with augment_errors=True (catalog branch redrawn each epoch)")
    ap.add_argument("--out", default=str(HERE / "results" / "qso_images"))
    args = ap.parse_args(argv)

    import torch
    from speed_memory import cpu_name

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import rail.deepz  # noqa: F401
    from rail.estimation.algos.deepz_cnn import DeepzCNNEstimator, DeepzCNNInformer

    data, lost = load_qso()
    train = {k: np.concatenate([data["train"][k], data["val"][k]]) for k in data["train"]}
    train["is_val"] = np.r_[np.zeros(len(data["train"]["redshift"]), bool), np.ones(len(data["val"]["redshift"]), bool)]
    test = data["test"]
    common = dict(bands=BANDS, err_bands=ERRS, mag_limits={b: 30.0 for b in BANDS}, redshift_col="redshift",
                  zmin=2.5, zmax=7.5, hdf5_groupname="", progress=False, device=args.device)
    settings = dict(epochs=args.epochs, n_members=args.members, n_components=args.components, seed=args.seed,
                    conv_channels=[16, 32, 64], dense_units=[64, 64], batch_size=128, lr=1e-3, patience=args.patience,
                    loss=args.loss,
                    val_column="is_val", image_bands=list("ugriz"),
                    catalog_epochs=args.catalog_epochs or args.epochs)
    import tempfile

    tmp = tempfile.TemporaryDirectory()  # the informer writes its model file there, not in the cwd
    pool_settings = dict(ensemble="pool", pool_losses=["crps", "nll"], pool_n_components=args.pool_components,
                         pool_lrs=args.pool_lrs, pool_size=args.pool_size, n_select=args.select,
                         pool_weighting=args.pool_weighting)
    if args.pool:
        settings["pool"] = pool_settings
    runs = [] if (args.pool and args.no_seed_row) else [
        ("images + catalog" + (f", seed ensemble ({args.members})" if args.pool else ""), True, {})]
    if args.augment_errors:
        runs.append(("images + catalog, augment_errors", True, {"augment_errors": True}))
    if args.pool:
        runs.append((f"images + catalog, PICZL pool (select {args.select}, {args.pool_weighting} weights)", True,
                     pool_settings))
    if not args.no_catalog:
        runs.append(("catalog only", False, {}))
    import subprocess

    try:  # the commit the run starts from
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:  # pragma: no cover
        commit = "?"
    rows = {}
    load_before = os.getloadavg()
    for i, (label, use_images, extra) in enumerate(runs):
        t0 = time.perf_counter()
        run_settings = {k: v for k, v in settings.items() if k not in ("catalog_epochs", "pool")}
        run_settings.update(extra)
        if not use_images:
            run_settings["epochs"] = settings["catalog_epochs"]
        inf = DeepzCNNInformer.make_stage(name=f"qso_inf_{i}", use_images=use_images,
                                          model=str(Path(tmp.name) / f"qso_cnn_{i}.pkl"),
                                          **common, **run_settings)
        inf.inform(train)
        t_train = time.perf_counter() - t0
        est = DeepzCNNEstimator.make_stage(name=f"qso_est_{i}", model=inf.get_handle("model"),
                                           hdf5_groupname="", output_mode="return", device=args.device)
        t0 = time.perf_counter()
        ens = est.estimate(test).data
        t_est = time.perf_counter() - t0
        row = metrics(ens, test["redshift"])
        row.update(train_s=round(t_train, 1), estimate_s=round(t_est, 2),
                   objects_per_s=round(len(test["redshift"]) / t_est, 1),
                   epochs_run=[len(r["history"]) for r in inf.model["train"]],
                   members=len(inf.model["member_state_dicts"]),
                   components=int(np.shape(ens.objdata["weights"])[1]),
                   zmode_eta=float(eta_of(ens.ancil["zmode"], test["redshift"])))
        if "pool" in inf.model:
            p = inf.model["pool"]
            row.update(pool_trained=len(p["members"]), selected=p["selected"],
                       selected_specs=[p["members"][j] for j in p["selected"]],
                       weights=[round(w, 4) for w in inf.model["member_weights"]],
                       pool_val_eta=[round(v, 4) for v in p["val_eta"]],
                       val_eta_selected=round(p["val_eta_selected"], 4),
                       pool_epochs_run=[len(r["history"]) for r in p["train"]])
        rows[label] = row
        device = str(est.torch_device)
        device_name = (torch.cuda.get_device_name(est.torch_device) if est.torch_device.type == "cuda"
                       else cpu_name())
        print(label, row, file=sys.stderr, flush=True)
    if not args.no_flexzboost:
        rows["FlexZBoost (catalog)"] = flexzboost_row(train, test, common)
        print("FlexZBoost", rows["FlexZBoost (catalog)"], file=sys.stderr, flush=True)

    machine = dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
                   torch_threads=torch.get_num_threads(), device=device, device_name=device_name,
                   torch=torch.__version__, commit=commit,
                   load_average_before=[round(v, 2) for v in load_before],
                   load_average_after=[round(v, 2) for v in os.getloadavg()],
                   date=_dt.datetime.now().isoformat(timespec="seconds"))
    n = {k: len(v["redshift"]) for k, v in data.items()}
    result = dict(data="sdss_qso_stamps (ugriz 32x32 stamps + TrainingDatasets.csv)", n=n, lost_in_join=lost,
                  settings=settings, machine=machine, results=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Image CNN + GMM ensemble vs catalog-only on SDSS high-z quasars",
        "",
        f"Data: {result['data']}; objects train/val/test = {n['train']}/{n['val']}/{n['test']} "
        f"(rows lost in the id join: {lost}). Redshift 2.75-7.04, PDFs on [2.5, 7.5].",
        f"Settings: {settings}.",
        f"Machine: {machine}.",
        "Metrics on the test split; point estimate = PDF median; eta = |dz|/(1+z) > 0.15; "
        f"objects/s = estimation throughput (5-band stamps + catalog; CNN on {device}: {device_name}). "
        "FlexZBoost: RAIL's baseline on the same ugriz magnitudes and splits (train + val).",
        *([f"**Smoke run**: {args.epochs} epochs, not trained to convergence; the rows show that the options "
           "run end to end, not which is more accurate."] if args.epochs < 20 else []),
        "",
        "| model | sigma_NMAD | eta | eta (zmode) | CRPS | PIT KS | bias | members (components) | train s "
        "| epochs run (per member) | objects/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        mc = f"{r['members']} ({r['components']})" if "members" in r else "-"
        zm = f"{r['zmode_eta']:.3f}" if "zmode_eta" in r else "-"
        lines.append(f"| {label} | {r['sigma_nmad']:.4f} | {r['eta']:.3f} | {zm} | {r['crps']:.4f} | "
                     f"{r['pit_ks']:.3f} | {r['bias']:+.4f} | {mc} | {r['train_s']} | {r.get('epochs_run', '-')} | "
                     f"{r['objects_per_s']} |")
    for label, r in rows.items():
        if "pool_trained" in r:
            lines += ["", f"{label}: {r['pool_trained']} members trained (epochs run {r['pool_epochs_run']}), "
                      f"validation eta (zmode) of each {r['pool_val_eta']}; selected {r['selected']} = "
                      f"{r['selected_specs']} with weights {r['weights']} (validation eta of the ensemble "
                      f"{r['val_eta_selected']}). Train s includes the whole pool."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
