"""Depth-augmentation benchmark (issue 18): ``augment_depth`` where the test photometry is
shallower than the training photometry, on SDSS BOSS DR10.

Design (why it is a fair test of the method): ``augment_depth`` claims one thing, that a
network trained on deep photometry does better on a *shallower* target when its training
photometry is degraded to the target's noise each epoch. The test isolates that claim:

* one population: the BOSS preset's seeded random 70/30 split (``rail.deepz.datasets.load_boss``),
  so train and test galaxies come from the same colour-magnitude-redshift distribution.
  Splitting by magnitude instead (train bright, test faint) would mix the depth change with a
  shift of the population (fainter BOSS galaxies lie at higher redshift and other colours),
  which no noise model can fix, and would not say whether the method does what it claims;
* only the noise differs: the test photometry is degraded in flux space to a 5-sigma depth
  ``--shallower`` magnitudes brighter than the catalogue's own in every band (deep
  spectroscopic training set, shallower photometric target), with sky-dominated noise (one
  flux error per band, errors recomputed from the noisy flux, draws beyond the band's
  ``mag_limits`` become non-detections (99)), by :func:`rail.deepz.augment.resample_photometry`;
* the depth the models are told is *estimated from the degraded test catalogue's own
  errors* (:func:`rail.deepz.augment.depth_from_errors`: median over valid measurements of
  ``m5_i = m_i + 2.5 log10(SNR_i / 5)``), as a user would do, not the value used to degrade;
* because the uniform degradation uses the method's own noise model (the favourable case), a
  second test copy breaks it: a random half of the objects at the depth - ``--depth-split``
  mag, the other half at + ``--depth-split`` (a two-depth footprint), scored with the same
  models;
* the deep (undegraded) test set is scored too: the cost of augmentation where depths match.

The models are trained on a random ``--n-train`` (default 8,000) of the 25,033 training rows
(time budget) and scored on the whole 10,729-row test split. Rows: NNC and LSTM (registry settings), each without augmentation, with ``augment_errors``
and with ``augment_depth`` = the estimated test depth, for each seed in ``--seeds``;
FlexZBoost (no augmentation option) trained on the deep training set, and trained on one
degraded realisation of it (``flexzboost_degraded``: the usual "degrade the training set
once" recipe; ``nnc_degraded`` / ``lstm_degraded`` likewise, first seed only). All rows
are trained through the registry (:func:`rail.evaluation.deepz_compare.run_estimator`) and
scored by :func:`rail.evaluation.deepz_compare.compare` (point estimate zmode).

    python benchmarks/depth_augment.py            # writes benchmarks/results/depth_augment_boss.{json,md}
    python benchmarks/depth_augment.py --quick    # smoke run (quick configs, 4,000 objects, one seed)
    # issue 18's re-run: only the augmented rows, each _depth row also with the validation split left at
    # the training depth (--before), the earlier run's summary carried beside them (--previous)
    python benchmarks/depth_augment.py --rows '_(aug|depth)' --before --previous OLD.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import git_commit, machine_info  # noqa: E402
from stack import split_file  # noqa: E402

REPORT = ["rail_sigma_iqr", "rail_outlier_rate", "sigma_nmad", "eta", "bias_median", "crps", "pit_ks", "cde_loss"]
SUMMARY = ["rail_sigma_iqr", "rail_outlier_rate", "eta", "pit_ks", "crps", "cde_loss"]
VARIANTS = {"": {}, "_aug": {"augment_errors": True}, "_depth": "depth"}
#: row suffix of ``--before``: an ``augment_depth`` row trained with the validation split left at the
#: training depth (the behaviour before issue 18's fix), by :func:`validation_at_training_depth`
BEFORE = "_depth_before"
#: the informer modules whose validation split ``augment_depth`` degrades
INFORMER_MODULES = ("rail.estimation.algos.deepz_nnc", "rail.estimation.algos.deepz_lstm")
COPIES = ("deep", "shallow", "twodepth")


def photometry_settings(ds) -> dict:
    """The photometry conventions the estimators use on ``ds`` (registry shared options, stage defaults)."""
    return dict(mag_limits=dict(ds.mag_limits), nondetect_val=float(ds.extra.get("nondetect_val", 99.0)),
                nondetect_err=1.0, missing_policy="limit", max_mag_err=5.0, valid_mag_range=[0.0, 50.0])


def measured(ds, table):
    """The table's photometry with non-detections flagged (``valid`` False)."""
    from rail.deepz.photometry import extract_photometry

    s = photometry_settings(ds)
    return extract_photometry(table, ds.bands, ds.err_bands, mag_limits=s["mag_limits"],
                              nondetect_val=s["nondetect_val"], missing_policy="mask", max_mag_err=s["max_mag_err"])


def degrade_table(ds, table: dict, depth: dict, rng: np.random.Generator, rows=None) -> dict:
    """A copy of ``table`` whose measured magnitudes (of ``rows``, default all) are degraded to the
    5-sigma ``depth`` {band: m5}; draws that are no longer measurements are written as the
    data set's non-detection marker with error ``nondetect_err``; other columns are copied."""
    from rail.deepz.augment import resample_photometry

    s = photometry_settings(ds)
    out = {k: np.array(v, copy=True) for k, v in table.items()}
    rows = np.arange(len(table[ds.redshift_col])) if rows is None else np.asarray(rows)
    phot = measured(ds, {k: np.asarray(v)[rows] for k, v in table.items()})
    new = resample_photometry(phot, rng, s, errors=False, depth=depth)
    for j, (b, e) in enumerate(zip(ds.bands, ds.err_bands)):
        was, lost = phot.valid[:, j], phot.valid[:, j] & ~new.valid[:, j]
        mag, err = out[b][rows].astype(np.float64), out[e][rows].astype(np.float64)
        mag[was], err[was] = new.mags[was, j], new.errs[was, j]
        mag[lost], err[lost] = s["nondetect_val"], s["nondetect_err"]
        out[b][rows], out[e][rows] = mag, err
    return out


def make_test_copies(ds, m5_shallow: dict, split: float, seed: int) -> dict:
    """{copy name: table}: the deep test set, its uniform degradation to ``m5_shallow`` and the
    two-depth copy (random half at m5 - split, half at m5 + split)."""
    rng = np.random.default_rng(seed)
    n = len(ds.test[ds.redshift_col])
    shallow = degrade_table(ds, ds.test, m5_shallow, rng)
    half = rng.permutation(n)[: n // 2]
    other = np.setdiff1d(np.arange(n), half)
    two = degrade_table(ds, ds.test, {b: m - split for b, m in m5_shallow.items()}, rng, half)
    two = degrade_table(ds, two, {b: m + split for b, m in m5_shallow.items()}, rng, other)
    return {"deep": ds.test, "shallow": shallow, "twodepth": two}


def rows_to_run(seeds, m5_test: dict, methods=("nnc", "lstm"), before: bool = False,
                pattern: str | None = None) -> list[tuple[str, str, dict, bool]]:
    """(row label, registry key, inform overrides, trained on the once-degraded training set);
    ``before`` adds a :data:`BEFORE` row beside each ``_depth`` row; ``pattern`` (a regular
    expression searched in the label) keeps only the matching rows."""
    rows = []
    variants = dict(VARIANTS, **({BEFORE: "depth"} if before else {}))
    for base in methods:
        for seed in seeds:
            for suffix, opts in variants.items():
                opts = {"augment_depth": dict(m5_test)} if opts == "depth" else dict(opts)
                rows.append((f"{base}{suffix}_s{seed}", base, {**opts, "seed": seed}, False))
        rows.append((f"{base}_degraded_s{seeds[0]}", base, {"seed": seeds[0]}, True))
    rows += [("flexzboost", "flexzboost", {}, False), ("flexzboost_degraded", "flexzboost", {}, True)]
    return [r for r in rows if pattern is None or re.search(pattern, r[0])]


@contextmanager
def validation_at_training_depth(active: bool = True):
    """While active, the informers train ``augment_depth`` with the *measured* validation split
    (the behaviour before issue 18's fix): their ``validation_at_depth`` returns None."""
    import importlib

    mods = [importlib.import_module(m) for m in INFORMER_MODULES] if active else []
    saved = [m.validation_at_depth for m in mods]
    for m in mods:
        m.validation_at_depth = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.validation_at_depth = f


def previous_summary(path: str | None) -> dict | None:
    """The identification and per-seed summary of an earlier run's JSON (``--previous``), or None."""
    if not path:
        return None
    old = json.loads(Path(path).read_text())
    keys = ("date", "git_commit", "load_note", "loadavg_start", "loadavg_end", "wall_time_s", "n_train", "n_test",
            "seeds", "augment_depth", "seed_summary", "metrics", "timings_s_under_load")
    return {k: old.get(k) for k in keys}


def seed_summary(metrics: dict, seeds) -> dict:
    """{row without seed: {metric: (mean, half range over seeds)}} for the rows run with every seed."""
    out = {}
    for label in sorted({k.rsplit("_s", 1)[0] for k in metrics if "_s" in k and not k.endswith("_degraded")}):
        vals = [metrics.get(f"{label}_s{s}") for s in seeds]
        if any(v is None for v in vals):
            continue
        out[label] = {m: (float(np.mean([v[m] for v in vals])), float(np.ptp([v[m] for v in vals]) / 2))
                      for m in SUMMARY}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick configs on 4,000 objects, first seed only")
    p.add_argument("--seeds", default="42,1", help="training seeds of the NNC and LSTM rows")
    p.add_argument("--shallower", type=float, default=1.0, help="test depth = catalogue depth - this (mag)")
    p.add_argument("--depth-split", type=float, default=0.3, help="two-depth copy: +- this around the test depth")
    p.add_argument("--n-train", type=int, default=8000, help="random subset of the BOSS training split (the "
                   "whole benchmark has to finish in about an hour on a loaded 2-core machine); 0 = all 25,033")
    p.add_argument("--methods", default="nnc,lstm")
    p.add_argument("--before", action="store_true", help=f"also train each _depth row with the validation split "
                   f"left at the training depth (rows '{BEFORE}_s<seed>': the behaviour before issue 18's fix)")
    p.add_argument("--rows", default=None, help="regular expression: train and score only the rows whose label "
                   "matches (e.g. '_(aug|depth)' for the augmented NNC/LSTM rows)")
    p.add_argument("--previous", default=None, help="JSON of an earlier run whose per-seed summary is carried into "
                   "this run's results (labelled with its commit), e.g. the rows this run does not retrain")
    p.add_argument("--rescore", action="store_true", help="train nothing: score the rows whose three qp files an "
                   "earlier run left in --out (same seeded split and test copies); times not re-measured")
    p.add_argument("--out", default=str(HERE / "out" / "depth_augment_boss"))
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--load-note", default="under load: a 2-core machine shared with other engineers' runs",
                   help="what else ran on the machine (recorded with the times)")
    args = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(args)

    from rail.deepz import datasets
    from rail.deepz.augment import depth_from_errors
    from rail.evaluation import deepz_registry as reg
    from rail.evaluation.deepz_compare import compare, format_table, overall_table, run_estimator

    seeds = [int(s) for s in a.seeds.split(",")][: 1 if a.quick else None]
    out = Path(a.out + ("_quick" if a.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()  # the code that runs: read at the start
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    try:
        ds = datasets.load_boss(n_max=4000 if a.quick else None)
    except FileNotFoundError as err:
        print(f"[depth] needs the SDSS BOSS DR10 files: {err}", flush=True)
        return 1
    ds.train = datasets.subsample(ds.train, a.n_train or None, seed=3)
    n_tr, n_te = len(ds.train[ds.redshift_col]), len(ds.test[ds.redshift_col])
    m5_train = depth_from_errors(measured(ds, ds.train))
    m5_catalogue_test = depth_from_errors(measured(ds, ds.test))
    m5_target = {b: m - a.shallower for b, m in m5_train.items()}
    copies = make_test_copies(ds, m5_target, a.depth_split, seed=2026)
    m5_est = {c: depth_from_errors(measured(ds, t)) for c, t in copies.items()}
    m5_test = {b: round(v, 3) for b, v in m5_est["shallow"].items()}  # what the depth rows are told
    nondet = {c: {b: float(np.mean(~measured(ds, t).valid[:, j])) for j, b in enumerate(ds.bands)}
              for c, t in copies.items()}
    print(f"[depth] BOSS train {n_tr} / test {n_te}; m5 train {m5_train}; degrade to {m5_target}; "
          f"estimated from the degraded test {m5_test}", flush=True)

    # one estimate call per row: the three copies stacked, with distinct ids, cut apart afterwards
    id_col = ds.extra.get("id_col") or "object_id"
    ids = {c: np.asarray(ds.test[id_col]) + k * (int(np.max(ds.test[id_col])) + 1) for k, c in enumerate(COPIES)}
    stacked = {k: np.concatenate([np.asarray(copies[c][k]) if k != id_col else ids[c] for c in COPIES])
               for k in ds.test}
    ds_run = copy.copy(ds)
    ds_run.test = stacked
    ds_degraded = copy.copy(ds_run)
    ds_degraded.train = degrade_table(ds, ds.train, m5_test, np.random.default_rng(2027))

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    files, timings = {c: {} for c in COPIES}, {}
    previous = previous_summary(a.previous)  # read before --results may overwrite it
    for label, key, opts, degraded in rows_to_run(seeds, m5_test, methods, a.before, a.rows):
        if a.rescore:
            if all((out / f"{label}_{c}.hdf5").exists() for c in COPIES):
                for c in COPIES:
                    files[c][label] = str(out / f"{label}_{c}.hdf5")
            continue
        base = reg.get(key)
        spec = replace(base, key=label, inform_options={**base.inform_options, **opts})
        with validation_at_training_depth(BEFORE in label):
            path, t = run_estimator(spec, ds_degraded if degraded else ds_run, out, quick=a.quick,
                                    log=lambda m: print(m, flush=True), progress=False)
        rest = out / f"{label}_rest.hdf5"
        split_file(path, n_te, out / f"{label}_deep.hdf5", rest)
        split_file(rest, n_te, out / f"{label}_shallow.hdf5", out / f"{label}_twodepth.hdf5")
        rest.unlink()
        for c in COPIES:
            files[c][label] = str(out / f"{label}_{c}.hdf5")
        timings[label] = {**t, "n_test": n_te, "estimate_rows": 3 * n_te}

    metrics, tables = {}, {}
    for c in COPIES:
        truth = {"redshift": np.asarray(ds.test[ds.redshift_col]), ds.ref_band: np.asarray(ds.test[ds.ref_band]),
                 id_col: ids[c]}
        res = compare(estimates=files[c], truth=truth, redshift_col="redshift", mag_col=ds.ref_band, id_col=id_col,
                      zmin=ds.zmin, zmax=ds.zmax, outdir=out / f"compare_{c}", plots=False, print_table=False,
                      progress=False)
        wide = overall_table(res.table, REPORT)
        metrics[c] = {e: {k: (None if v != v else float(v)) for k, v in row.items()} for e, row in wide.iterrows()}
        tables[c] = format_table(res.table, "markdown", REPORT)
    summary = {c: seed_summary(metrics[c], seeds) for c in COPIES}
    wall = time.perf_counter() - t_start
    report = {
        "benchmark": "depth_augment", "date": when, "git_commit": commit, "machine": machine_info(),
        "load_note": a.load_note, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "wall_time_s": wall, "data": "boss", "quick": a.quick, "n_train": n_tr, "n_test": n_te, "seeds": seeds,
        "shallower_mag": a.shallower, "depth_split_mag": a.depth_split, "m5_train": m5_train,
        "m5_catalogue_test": m5_catalogue_test, "m5_degraded_to": m5_target, "m5_estimated": m5_est,
        "augment_depth": m5_test, "nondetected_fraction": nondet, "point_estimate": "zmode",
        "metrics": metrics, "seed_summary": summary, "timings_s_under_load": timings,
        "rows_pattern": a.rows, "before_rows": a.before, "previous_run": previous,
    }
    res_dir = Path(a.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = "depth_augment_boss" + ("_quick" if a.quick else "")
    (res_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    fmt = lambda d: ", ".join(f"{b} {v:.2f}" for b, v in d.items())  # noqa: E731
    lines = [
        "# augment_depth where the test photometry is shallower: SDSS BOSS DR10", "",
        f"{when}, commit {report['git_commit']}; {report['machine']['platform']}, {report['machine']['cpu_count']} "
        f"CPUs, torch {report['machine']['torch']} ({report['machine']['torch_threads']} thread); "
        f"{a.load_note} (load average {load_start[0]:.1f} at start, {report['loadavg_end'][0]:.1f} at end); "
        f"whole run {wall / 60:.0f} min. Produced by `{shlex.join(['python', 'benchmarks/depth_augment.py', *args])}`"
        f"{'; QUICK settings (not representative)' if a.quick else ''}.", "",
        f"Train {n_tr} (random subset of the training split) / test {n_te} objects (BOSS preset, seeded random "
        f"70/30 split); seeds {seeds}; "
        "point estimate zmode; registry settings.", "",
        f"* 5-sigma depth of the catalogue (`depth_from_errors`, training set): {fmt(m5_train)}",
        f"* test copy `shallow` degraded to {fmt(m5_target)} ({a.shallower} mag shallower); read back from its "
        f"errors: {fmt(m5_est['shallow'])} (the `augment_depth` of the `_depth` rows)",
        f"* test copy `twodepth`: half at -{a.depth_split}, half at +{a.depth_split} mag around that; read back: "
        f"{fmt(m5_est['twodepth'])}",
        "* non-detected fraction per band: " + "; ".join(f"{c}: {fmt(v)}" for c, v in nondet.items()), "",
    ]
    if a.rows or a.before:
        lines += [f"Rows trained in this run: {'those matching `' + a.rows + '`' if a.rows else 'all'}"
                  + (f"; `{BEFORE}` rows: `augment_depth` with the validation split left at the training depth "
                     "(this commit's code with `validation_at_depth` switched off, i.e. the behaviour before "
                     "issue 18's fix)" if a.before else "") + ".", ""]

    def summary_tables(summ, title):
        out_lines = [title, ""]
        for c in COPIES:
            out_lines += [f"Test copy `{c}`:", "", "| row | " + " | ".join(SUMMARY) + " |",
                          "|---|" + "---|" * len(SUMMARY)]
            out_lines += [f"| {r} | " + " | ".join(f"{m:.4g} ± {h:.2g}" for m, h in (v[k] for k in SUMMARY))
                          + " |" for r, v in summ[c].items()]
            out_lines.append("")
        return out_lines

    if len(seeds) > 1:
        lines += summary_tables(summary, f"## Mean over seeds {seeds} (± half the range)")
    if previous and previous.get("seed_summary"):
        lines += summary_tables(
            previous["seed_summary"],
            f"## Previous run: before (validation at training depth), mean over seeds {previous['seeds']}\n\n"
            f"Carried from `--previous` {a.previous}: {previous['date']}, commit {previous['git_commit']}, "
            f"train {previous['n_train']} / test {previous['n_test']}, whole run "
            f"{(previous.get('wall_time_s') or 0) / 60:.0f} min ({previous.get('load_note')}). Every `_depth` row "
            "there trained with the validation split at the training depth.")
    for c in COPIES:
        lines += [f"## Test copy `{c}`, every row", "", tables[c], ""]
    lines += ["## Times (wall-clock seconds under load; estimate = the three test copies in one call)", "",
              "| row | inform_time_s | estimate_time_s |", "|---|---|---|",
              *[f"| {k} | {t['inform_time_s']:.1f} | {t['estimate_time_s']:.1f} |" for k, t in timings.items()], ""]
    if a.rescore:
        lines[-2:] = ["(not measured: `--rescore` scored the qp files of an earlier run)", ""]
    (res_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"[depth] wrote {res_dir / (stem + '.json')} and .md ({wall / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
