"""Scene benchmark (issue 17): the scene estimator against catalog estimators on sep photometry of the same pixels.

Steps (all seeded):

1. simulate training scenes from the pz-rail-base DC2 training file and test scenes from the
   DC2 validation file (:func:`rail.deepz.scenes.simulate_scenes`; different objects);
2. catalog path: sep detection + deblending + aperture photometry on both
   (:func:`rail.deepz.scenes.sep_photometry`), detections matched to truth; NNC, FlexZBoost and BPZ
   (``CATALOG_ESTIMATORS``, with the comparison harness's registry settings, run through
   :func:`rail.evaluation.deepz_compare.run_estimator`) trained on the matched training detections
   (their true redshifts) and run on the test detections;
3. scene path: :class:`DeepzSceneInformer` on the training scenes, :class:`DeepzSceneEstimator` in
   ``detect`` mode on the test scenes (and in ``positions`` mode at sep's detections);
4. two-stage scene path: the network's detections, forced aperture photometry of the pixels at
   those positions (:func:`rail.deepz.scenes.forced_photometry`), FlexZBoost on it (trained on the
   network's matched detections of the training scenes);
5. detection completeness / purity of both paths; photo-z metrics on the gold objects both paths
   matched, split isolated / mildly blended / blended, with bootstrap intervals
   (:mod:`rail.evaluation.deepz_scene_metrics`);
6. optionally (``--control``) the same with the redshift-free, magnitude-free size law
   (``size_law='shuffled'``), summarised beside the main run.

Writes ``benchmarks/results/scenes.json`` and ``scenes.md`` with machine, date, commit and the
load average. ``--config cpu`` trains in minutes on 2 cores (1 torch thread: set
``DEEPZ_NUM_THREADS=1`` on a shared machine); ``--config gpu --device cuda`` is the larger
configuration for a GPU (4000 training scenes of 64 x 64 pixels, width 32, 60 epochs).

    DEEPZ_NUM_THREADS=1 PYTHONPATH=src python benchmarks/scenes.py --config cpu --control
    PYTHONPATH=src python benchmarks/scenes.py --config gpu --device cuda --control
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: the catalog estimators run on sep photometry, with the comparison harness's settings (registry)
CATALOG_ESTIMATORS = ["nnc", "flexzboost", "bpz"]

CONFIGS = {
    # scenes of 48 x 48 pixels (9.6 arcsec), 4-8 DC2 objects + 0-3 faint background objects each
    "cpu": dict(size=48, n_train=800, n_test=250, n_objects=(4, 8), n_background=(0, 3), epochs=30, width=16,
                hidden=64, batch_size=8, n_boot=100, catalog_estimators=CATALOG_ESTIMATORS),
    # for a GPU (``--device cuda``): 5x the scenes, denser, a wider network, longer training
    "gpu": dict(size=64, n_train=4000, n_test=1000, n_objects=(5, 12), n_background=(0, 5), epochs=60, width=32,
                hidden=128, batch_size=32, n_boot=200, catalog_estimators=CATALOG_ESTIMATORS),
    # tiny smoke configuration (a few minutes; numbers meaningless)
    "smoke": dict(size=32, n_train=60, n_test=30, n_objects=(3, 5), n_background=(0, 1), epochs=3, width=8,
                  hidden=16, batch_size=8, n_boot=20, catalog_estimators=CATALOG_ESTIMATORS),
}


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except Exception:  # pragma: no cover
        return "unknown"


def _catalog_dataset(dc2, name: str, train: dict, test: dict, limits: dict):
    """The DC2 data set's conventions (bands, errors, grid, BPZ filters) with sep-measured tables."""
    from dataclasses import replace

    return replace(dc2, name=name, train=train, test=test, mag_limits=dict(limits))


def _run_catalog_estimators(keys, ds, outdir: Path, log) -> tuple[dict, dict]:
    """The registry's stages (the harness's settings, :func:`rail.evaluation.deepz_compare.run_estimator`)
    on a catalog data set; returns ({key: qp ensemble}, {key: seconds})."""
    import qp

    from rail.evaluation import deepz_registry as reg
    from rail.evaluation.deepz_compare import run_estimator

    ens, secs = {}, {}
    for key in keys:
        t = time.perf_counter()
        path, _ = run_estimator(reg.get(key), ds, outdir, log=None, progress=False)
        ens[key] = qp.read(str(path))
        secs[key] = time.perf_counter() - t
        log(f"[{ds.name}] {key} done in {secs[key]:.0f} s")
    return ens, secs


def run_one(cfg: dict, size_law: str, seed: int, device: str, log, workdir: Path, scene_options=None,
            scene_only: bool = False) -> dict:
    """One size law: simulate, both paths, metrics. ``scene_only``: sep detections but no catalog estimators
    and no two-stage path (a network variant, compared with the catalog numbers of the main run)."""
    from rail.deepz.datasets import load_dc2
    from rail.deepz.scenes import SceneConfig, SepConfig, forced_photometry, sep_mag_limits, sep_photometry, simulate_scenes
    from rail.estimation.algos.deepz_scene import DeepzSceneEstimator, DeepzSceneInformer

    res: dict = {"size_law": size_law, "scene_options": dict(scene_options or {}), "timings_s": {}}
    t = time.perf_counter()
    dc2 = load_dc2()
    sc_cfg = SceneConfig(size=cfg["size"], n_objects=tuple(cfg["n_objects"]), n_background=tuple(cfg["n_background"]),
                         size_law=size_law, seed=seed)
    tr_sc, tr_truth = simulate_scenes(dc2.train, cfg["n_train"], sc_cfg)
    te_sc, te_truth = simulate_scenes(dc2.test, cfg["n_test"], sc_cfg, seed=seed + 1)
    res["timings_s"]["simulate"] = time.perf_counter() - t
    res["truth"] = {"n_train_objects": int(len(tr_truth["x"])), "n_test_objects": int(len(te_truth["x"])),
                    "test_gold": int(te_truth["gold"].sum()),
                    "test_blended_share": float(np.mean(te_truth["blendedness"][te_truth["gold"]] >= 0.2))}
    log(f"[{size_law}] simulated in {res['timings_s']['simulate']:.0f} s")
    bands = [f"mag_{b}_lsst" for b in "ugrizy"]
    errs = [f"mag_err_{b}_lsst" for b in "ugrizy"]
    sep_cfg = SepConfig()
    limits = sep_mag_limits(sc_cfg, sep_cfg)

    def train_table(cat, d2t):
        rows = np.flatnonzero((d2t >= 0) & np.isfinite(cat["redshift"]))
        out = {k: np.asarray(cat[k])[rows] for k in bands + errs + ["redshift"]}
        out["id"] = np.arange(rows.size)
        return out

    def test_table(cat):
        out = {k: np.asarray(cat[k]) for k in bands + errs}
        out["id"] = np.arange(len(cat["x"]))
        return out

    # --- catalog path: sep detection + photometry, then NNC, FlexZBoost and BPZ as the harness runs them
    t = time.perf_counter()
    tr_cat = sep_photometry(tr_sc, tr_truth, sep_cfg)
    te_cat = sep_photometry(te_sc, te_truth, sep_cfg)
    res["timings_s"]["sep"] = time.perf_counter() - t
    sep_ds = _catalog_dataset(dc2, f"sep_{size_law}", train_table(tr_cat, tr_cat["truth_index"]), test_table(te_cat),
                              limits)
    res["catalog_path"] = {"n_train": int(len(sep_ds.train["id"])), "n_test": int(len(sep_ds.test["id"])),
                           "estimators": list(cfg["catalog_estimators"])}
    cat_ens, cat_secs = _run_catalog_estimators([] if scene_only else cfg["catalog_estimators"], sep_ds,
                                                workdir / f"sep_{size_law}", log)
    for k, v in cat_secs.items():
        res["timings_s"][f"{k}_on_sep"] = v

    # --- scene path
    t = time.perf_counter()
    inf = DeepzSceneInformer.make_stage(name=f"scene_inf_{size_law}", epochs=cfg["epochs"], width=cfg["width"],
                                        hidden=cfg["hidden"], batch_size=cfg["batch_size"], device=device,
                                        seed=seed, progress=True, num_threads=cfg.get("num_threads", 0),
                                        **(scene_options or {}))
    model = inf.inform(tr_sc, tr_truth)
    res["timings_s"]["scene_inform"] = time.perf_counter() - t
    res["scene_training"] = {k: v for k, v in model().get("train", {}).items() if k != "history"}
    res["scene_training"]["epochs_run"] = len(model()["train"]["history"])
    t = time.perf_counter()
    est = DeepzSceneEstimator.make_stage(name=f"scene_est_{size_law}", model=model, device=device, chunk_size=64)
    net_ens = est.estimate(te_sc, truth=te_truth)()
    res["timings_s"]["scene_estimate"] = time.perf_counter() - t
    pos = {"scene_id": te_cat["scene_id"], "x": te_cat["x"], "y": te_cat["y"]}
    est_p = DeepzSceneEstimator.make_stage(name=f"scene_pos_{size_law}", model=model, device=device, mode="positions")
    pos_ens = est_p.estimate(te_sc, positions=pos)()

    # --- two-stage scene path: the network's detections, forced aperture photometry of the pixels at
    # those positions, FlexZBoost on it (trained on the network's matched detections of the training scenes)
    t = time.perf_counter()
    if scene_only:
        return _finish(res, cfg, seed, te_truth, te_cat, net_ens, pos_ens, None, cat_ens, log)
    est_tr = DeepzSceneEstimator.make_stage(name=f"scene_est_tr_{size_law}", model=model, device=device, chunk_size=64)
    net_tr = est_tr.estimate(tr_sc, truth=tr_truth)()
    net_tr_d2t = np.asarray(net_tr.ancil["truth_index"], dtype=np.int64)

    def at(ens):
        return {k: np.asarray(ens.ancil[k]) for k in ("scene_id", "x", "y")}

    f_tr = forced_photometry(tr_sc, at(net_tr), sep_cfg)
    f_tr["redshift"] = np.where(net_tr_d2t >= 0, np.asarray(tr_truth["redshift"])[np.maximum(net_tr_d2t, 0)], np.nan)
    f_te = forced_photometry(te_sc, at(net_ens), sep_cfg)
    forced_ds = _catalog_dataset(dc2, f"forced_{size_law}", train_table(f_tr, net_tr_d2t), test_table(f_te), limits)
    forced_ens, _ = _run_catalog_estimators(["flexzboost"], forced_ds, workdir / f"forced_{size_law}", log)
    res["timings_s"]["two_stage_forced_flexzboost"] = time.perf_counter() - t
    return _finish(res, cfg, seed, te_truth, te_cat, net_ens, pos_ens, forced_ens["flexzboost"], cat_ens, log)


def _finish(res, cfg, seed, te_truth, te_cat, net_ens, pos_ens, forced_ens, cat_ens, log) -> dict:
    """Detection and photo-z metrics of one run (added to ``res``)."""
    from rail.evaluation.deepz_scene_metrics import detection_metrics, per_object_quantities, photoz_by_blending

    size_law = res["size_law"]
    # --- detection
    net_d2t = np.asarray(net_ens.ancil["truth_index"], dtype=np.int64)
    sep_d2t = np.asarray(te_cat["truth_index"], dtype=np.int64)
    res["detection"] = {"scene_net": detection_metrics(te_truth, net_d2t), "sep": detection_metrics(te_truth, sep_d2t)}

    # --- photo-z on gold objects matched by both paths
    nt = len(te_truth["x"])
    net_of, sep_of = np.full(nt, -1), np.full(nt, -1)
    net_of[net_d2t[net_d2t >= 0]] = np.flatnonzero(net_d2t >= 0)
    sep_of[sep_d2t[sep_d2t >= 0]] = np.flatnonzero(sep_d2t >= 0)
    both = np.flatnonzero(te_truth["gold"] & (net_of >= 0) & (sep_of >= 0))
    zt = np.asarray(te_truth["redshift"], dtype=np.float64)
    blend = np.asarray(te_truth["blendedness"], dtype=np.float64)[both]
    res["photoz_n_common"] = int(both.size)
    out = {}
    runs = [("scene_net_detect", net_ens, net_of[both]),
            ("scene_net_at_sep_positions", pos_ens, sep_of[both]),
            ("two_stage_net_forced_flexzboost", forced_ens, net_of[both])]
    runs += [(f"{k}_on_sep", e, sep_of[both]) for k, e in cat_ens.items()]
    for name, ens, rows in runs:
        if ens is None:
            continue
        po = per_object_quantities(ens[rows], zt[both], 0.0, 3.0)
        out[name] = photoz_by_blending(po, blend, n_boot=cfg["n_boot"], seed=seed)
    res["photoz"] = out
    log(f"[{size_law}] done: {json.dumps(res['timings_s'])}")
    return res


def _fmt(m: dict) -> str:
    return f"{m['value']:.4f} [{m['lo']:.4f}, {m['hi']:.4f}]"


def _label(run: dict) -> str:
    """Size law, plus the scene-informer options of a variant run."""
    opts = run.get("scene_options") or {}
    return run["size_law"] + "".join(f" {k}={v}" for k, v in opts.items())


def _summary(runs: list) -> list:
    """Main run and size-control run side by side: detection, and sigma_IQR / eta / PIT KS per blending class."""
    if not runs:
        return []
    laws = [_label(r) for r in runs]
    lines = ["## Summary: " + " beside ".join(f"`{law}`" for law in laws), "",
             "Detection completeness of gold objects (isolated / blended >= 0.2) and purity:", "",
             "| path | " + " | ".join(f"{law}: isolated | {law}: blended | {law}: purity" for law in laws) + " |",
             "|---|" + "---|---|---|" * len(laws)]
    for path in runs[0]["detection"]:
        cells = []
        for r in runs:
            d = r["detection"][path]
            cells += [f"{d['completeness_isolated']:.3f}", f"{d['completeness_blended']:.3f}", f"{d['purity']:.3f}"]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines += ["", "Photo-z on gold objects matched by both paths, sigma_IQR / eta / PIT KS "
              "(bootstrap intervals in the sections below):", "",
              "| estimator | class | " + " | ".join(f"{law}: sigma_IQR | {law}: eta | {law}: PIT KS" for law in laws)
              + " |", "|---|---|" + "---|---|---|" * len(laws)]
    for name in runs[0]["photoz"]:
        for cls in ("isolated", "mild", "blended"):
            cells = []
            for r in runs:
                g = r["photoz"].get(name, {}).get(cls, {"n": 0})
                if g["n"] == 0:
                    cells += ["", "", ""]
                else:
                    cells += [f"{g['rail_sigma_iqr']['value']:.4f}", f"{g['eta']['value']:.3f}",
                              f"{g['pit_ks']['value']:.3f}"]
            lines.append(f"| {name} | {cls} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# Scene benchmark ({result['config_name']})", "",
             f"- date {result['date']}, commit {result['commit']}, machine: {result['machine']}",
             f"- load average at start / end: {result['load_start']} / {result['load_end']} "
             "(shared 2-core VM with other engineers' jobs running: timings are **under load**)",
             f"- device: {result['device']}; {result['gpu_note']}", f"- configuration: `{json.dumps(result['config'])}`", ""]
    lines += _summary(result["runs"])
    for run in result["runs"]:
        lines += [f"## size law `{run['size_law']}`" + (f", scene options {run['scene_options']}"
                                                          if run.get("scene_options") else ""), "", f"truth: {json.dumps(run['truth'])}", "",
                  "### Detection (gold objects; purity over all detections)", "",
                  "| path | purity | completeness | isolated | mild | blended (>=0.2) | n detections |",
                  "|---|---|---|---|---|---|---|"]
        for k, d in run["detection"].items():
            lines.append(f"| {k} | {d['purity']:.3f} | {d['completeness']:.3f} | {d['completeness_isolated']:.3f} "
                         f"| {d['completeness_mild']:.3f} | {d['completeness_blended']:.3f} | {d['n_detections']} |")
        lines += ["", f"### Photo-z on the {run['photoz_n_common']} gold objects both paths matched "
                  "(value [16%, 84%] bootstrap; a resample repeats objects, which biases the PIT KS "
                  "statistic upward, so its interval can lie above the value)", ""]
        for cls in ("all", "isolated", "mild", "blended"):
            lines += [f"**{cls}**", "", "| estimator | n | sigma_IQR | eta | bias (median) | CRPS | CDE loss | PIT KS |",
                      "|---|---|---|---|---|---|---|---|"]
            for name, g in run["photoz"].items():
                s = g[cls]
                if s["n"] == 0:
                    lines.append(f"| {name} | 0 | | | | | | |")
                    continue
                lines.append(f"| {name} | {s['n']} | {_fmt(s['rail_sigma_iqr'])} | {_fmt(s['eta'])} | {_fmt(s['bias_median'])} "
                             f"| {_fmt(s['crps'])} | {_fmt(s['cde_loss'])} | {_fmt(s['pit_ks'])} |")
            lines.append("")
        lines += [f"timings (s, under load): {json.dumps({k: round(v, 1) for k, v in run['timings_s'].items()})}", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--control", action="store_true", help="also run the shuffled (size-free) size law")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--laws", default="", help="comma list of size laws to run (default: magnitude, plus "
                   "shuffled with --control); one law per process lets two processes share a busy machine")
    p.add_argument("--aperture-radius", type=float, default=0.0,
                   help="DeepzSceneInformer option aperture_radius (pixels; 0 = off): aperture colours into the z head")
    p.add_argument("--scene-only", action="store_true",
                   help="network variant: skip the catalog estimators and the two-stage path")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only combine the runs of these result files (same configuration) into --out")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scenes"))
    a = p.parse_args(argv)
    cfg = CONFIGS[a.config]
    out = Path(a.out)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        if any(q["config"] != parts[0]["config"] for q in parts):
            raise SystemExit("--merge: the result files have different configurations")
        result = dict(parts[0], runs=[r for q in parts for r in q["runs"]],
                      commit=", ".join(sorted({q["commit"] for q in parts})),
                      date=" / ".join(q["date"] for q in parts),
                      load_start=[q["load_start"] for q in parts], load_end=[q["load_end"] for q in parts])
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
        write_markdown(result, out.with_suffix(".md"))
        return 0
    laws = [x for x in a.laws.split(",") if x] or ["magnitude"] + (["shuffled"] if a.control else [])

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import torch

    result = {"config_name": a.config, "config": cfg, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": _git_commit(), "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"DEEPZ_NUM_THREADS={os.environ.get('DEEPZ_NUM_THREADS', 'unset (automatic)')}",
              "load_start": [round(x, 2) for x in os.getloadavg()], "device": a.device,
              "gpu_note": "no GPU was lent to this run" if a.device == "cpu" else "", "runs": []}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deepz_scenes_") as tmp:
        for law in laws:
            opts = {"aperture_radius": a.aperture_radius} if a.aperture_radius > 0 else {}
            result["runs"].append(run_one(cfg, law, a.seed, a.device, log, Path(tmp), opts, a.scene_only))
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    write_markdown(result, out.with_suffix(".md"))
    log(f"wrote {out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
