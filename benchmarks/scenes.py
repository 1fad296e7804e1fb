"""Scene benchmark (issue 17): the scene estimator against FlexZBoost on sep photometry of the same pixels.

Steps (all seeded):

1. simulate training scenes from the pz-rail-base DC2 training file and test scenes from the
   DC2 validation file (:func:`rail.deepz.scenes.simulate_scenes`; different objects);
2. catalog path: sep detection + deblending + aperture photometry on both
   (:func:`rail.deepz.scenes.sep_photometry`), detections matched to truth; FlexZBoost trained on the
   matched training detections (their true redshifts) and run on the test detections;
3. scene path: :class:`DeepzSceneInformer` on the training scenes, :class:`DeepzSceneEstimator` in
   ``detect`` mode on the test scenes (and in ``positions`` mode at sep's detections);
4. detection completeness / purity of both paths; photo-z metrics on the gold objects both paths
   matched, split isolated / mildly blended / blended, with bootstrap intervals
   (:mod:`rail.evaluation.deepz_scene_metrics`);
5. optionally (``--control``) the same with the redshift-free, magnitude-free size law
   (``size_law='shuffled'``).

Writes ``benchmarks/results/scenes.json`` and ``scenes.md`` with machine, date, commit and the
load average. ``--config cpu`` trains in minutes on 2 cores; ``--config gpu`` is larger.

    PYTHONPATH=src python benchmarks/scenes.py --config cpu [--control]
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

CONFIGS = {
    # scenes of 48 x 48 pixels (9.6 arcsec), 4-8 DC2 objects + 0-3 faint background objects each
    "cpu": dict(size=48, n_train=800, n_test=250, n_objects=(4, 8), n_background=(0, 3), epochs=30, width=16,
                hidden=64, batch_size=8, n_boot=100, fzb_basis=20),
    "gpu": dict(size=64, n_train=4000, n_test=1000, n_objects=(5, 12), n_background=(0, 5), epochs=60, width=32,
                hidden=128, batch_size=32, n_boot=200, fzb_basis=35),
    # tiny smoke configuration (a minute)
    "smoke": dict(size=32, n_train=60, n_test=30, n_objects=(3, 5), n_background=(0, 1), epochs=3, width=8,
                  hidden=16, batch_size=8, n_boot=20, fzb_basis=10),
}


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except Exception:  # pragma: no cover
        return "unknown"


def run_one(cfg: dict, size_law: str, seed: int, device: str, log) -> dict:
    from rail.deepz.datasets import load_dc2
    from rail.deepz.scenes import SceneConfig, SepConfig, match_positions, sep_mag_limits, sep_photometry, simulate_scenes
    from rail.estimation.algos.deepz_scene import DeepzSceneEstimator, DeepzSceneInformer
    from rail.estimation.algos.flexzboost import FlexZBoostEstimator, FlexZBoostInformer
    from rail.evaluation.deepz_scene_metrics import detection_metrics, per_object_quantities, photoz_by_blending

    res: dict = {"size_law": size_law, "timings_s": {}}
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

    # --- catalog path
    t = time.perf_counter()
    sep_cfg = SepConfig()
    tr_cat = sep_photometry(tr_sc, tr_truth, sep_cfg)
    te_cat = sep_photometry(te_sc, te_truth, sep_cfg)
    res["timings_s"]["sep"] = time.perf_counter() - t
    bands = [f"mag_{b}_lsst" for b in "ugrizy"]
    errs = [f"mag_err_{b}_lsst" for b in "ugrizy"]
    limits = sep_mag_limits(sc_cfg, sep_cfg)
    train_rows = np.flatnonzero((tr_cat["truth_index"] >= 0) & np.isfinite(tr_cat["redshift"]))
    fzb_train = {k: np.asarray(tr_cat[k])[train_rows] for k in bands + errs + ["redshift"]}
    fzb_test = {k: np.asarray(te_cat[k]) for k in bands + errs}
    fzb_test["id"] = np.arange(len(te_cat["x"]))
    common = dict(bands=bands, err_bands=errs, mag_limits=limits, ref_band="mag_i_lsst", hdf5_groupname="",
                  zmin=0.0, zmax=3.0, nondetect_val=99.0)
    t = time.perf_counter()
    fzb_inf = FlexZBoostInformer.make_stage(name=f"fzb_inf_{size_law}", redshift_col="redshift", nzbins=301,
                                            trainfrac=0.75, max_basis=cfg["fzb_basis"], **common)
    fzb_model = fzb_inf.inform(fzb_train)
    fzb_est = FlexZBoostEstimator.make_stage(name=f"fzb_est_{size_law}", model=fzb_model, nzbins=301,
                                             qp_representation="interp", id_col="id", **common)
    fzb_ens = fzb_est.estimate(fzb_test)()
    res["timings_s"]["flexzboost"] = time.perf_counter() - t
    log(f"[{size_law}] sep + FlexZBoost done")

    # --- scene path
    t = time.perf_counter()
    inf = DeepzSceneInformer.make_stage(name=f"scene_inf_{size_law}", epochs=cfg["epochs"], width=cfg["width"],
                                        hidden=cfg["hidden"], batch_size=cfg["batch_size"], device=device,
                                        seed=seed, progress=True)
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
    for name, ens, rows in (("scene_net_detect", net_ens, net_of[both]),
                            ("scene_net_at_sep_positions", pos_ens, sep_of[both]),
                            ("flexzboost_on_sep", fzb_ens, sep_of[both])):
        po = per_object_quantities(ens[rows], zt[both], 0.0, 3.0)
        out[name] = photoz_by_blending(po, blend, n_boot=cfg["n_boot"], seed=seed)
    res["photoz"] = out
    log(f"[{size_law}] done: {json.dumps(res['timings_s'])}")
    return res


def _fmt(m: dict) -> str:
    return f"{m['value']:.4f} [{m['lo']:.4f}, {m['hi']:.4f}]"


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# Scene benchmark ({result['config_name']})", "",
             f"- date {result['date']}, commit {result['commit']}, machine: {result['machine']}",
             f"- load average at start / end: {result['load_start']} / {result['load_end']} "
             "(shared 2-core VM with other engineers' jobs running: timings are **under load**)",
             f"- device: {result['device']}; {result['gpu_note']}", f"- configuration: `{json.dumps(result['config'])}`", ""]
    for run in result["runs"]:
        lines += [f"## size law `{run['size_law']}`", "", f"truth: {json.dumps(run['truth'])}", "",
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
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scenes"))
    a = p.parse_args(argv)
    cfg = CONFIGS[a.config]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import torch

    result = {"config_name": a.config, "config": cfg, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": _git_commit(), "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} torch threads",
              "load_start": [round(x, 2) for x in os.getloadavg()], "device": a.device,
              "gpu_note": "no GPU was lent to this run" if a.device == "cpu" else "", "runs": []}
    for law in ["magnitude"] + (["shuffled"] if a.control else []):
        result["runs"].append(run_one(cfg, law, a.seed, a.device, log))
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    write_markdown(result, out.with_suffix(".md"))
    log(f"wrote {out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
