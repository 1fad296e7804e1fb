"""Why the embedding MDN's pooled width factor made the CDE loss positive (issue 18, DC2).

The former ``width_calibration='pit_ks'`` of the embedding MDN fitted one factor f on the
width of its fixed Gaussians so that the validation PITs were closest to uniform, with no
lower bound; on DC2 it chose 0.44 and the ensemble's test CDE loss went from -5.9 to +5.86
(``embed_x3_widthcal``, former basis). This script takes an embedding-MDN ensemble's PDFs
(its trained model estimated again as fixed-grid mixtures; no retraining), fits the former, unbounded factor
and the current bounded one (:func:`rail.estimation.algos.deepz_embed.fit_basis_width_factor`)
on the stack-validation rows, and scores the test rows with f = 1 and each factor:

* the CDE loss (RAIL's: 301-point grid on [zmin, zmax]) = mean int p^2 - 2 mean p(z_true),
  with both terms, and int p^2 also in closed form (sum_jk w_j w_k N(c_j - c_k; 0, 2 s^2));
* PIT KS (exact mixture CDFs), the quantity the factor minimises on the validation rows;
* the comb measure (:func:`rail.evaluation.deepz_metrics.local_maxima_count` on a 0.001 grid).

    python benchmarks/embed_widthcal.py --dir OUT --key embed_x3     # OUT from stack.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import git_commit  # noqa: E402
from stack import split_dataset  # noqa: E402


def read_fixed_grid(path) -> tuple[np.ndarray, np.ndarray, float]:
    """(weights (N, K), centres (K,), width) of a fixed-grid mixture qp file (same means and
    width in every row, as the embedding MDN writes them)."""
    import h5py

    with h5py.File(path, "r") as f:
        w = np.asarray(f["data"]["weights"][()], dtype=np.float64)
        mu = np.asarray(f["data"]["means"][0], dtype=np.float64)
        sd = np.asarray(f["data"]["stds"][0], dtype=np.float64)
    if not np.allclose(sd, sd[0]):
        raise ValueError(f"{path}: the components' widths differ: not a fixed-grid mixture")
    return w / w.sum(1, keepdims=True), mu, float(sd[0])


def scores(w, centers, sigma, z, zmin, zmax, chunk: int = 2000) -> dict:
    from scipy.special import ndtr

    from rail.deepz.calibration import ks_uniform
    from rail.deepz.mixtures import gaussian_basis
    from rail.evaluation.deepz_metrics import cde_terms, local_maxima_count

    grid = np.linspace(zmin, zmax, 301)
    fine = np.linspace(zmin, zmax, int(round((zmax - zmin) / 0.001)) + 1)
    b_grid, b_fine = (gaussian_basis(g, centers, sigma).double().numpy() for g in (grid, fine))
    d = centers[:, None] - centers[None, :]
    pair = np.exp(-d ** 2 / (4 * sigma ** 2)) / (2 * sigma * np.sqrt(np.pi))  # int N_j N_k dz
    t1, t2, exact, peaks, pit = [], [], [], [], []
    for s in range(0, len(z), chunk):
        ww, zz = w[s:s + chunk], z[s:s + chunk]
        a, b = cde_terms(ww @ np.asarray(b_grid, dtype=np.float64), grid, zz)
        t1.append(a), t2.append(b)
        exact.append(np.einsum("ij,jk,ik->i", ww, pair, ww))
        peaks.append(local_maxima_count(ww @ np.asarray(b_fine, dtype=np.float64)))
        pit.append((ww * ndtr((zz[:, None] - centers[None, :]) / sigma)).sum(1))
    t1, t2, exact, peaks = (np.concatenate(x) for x in (t1, t2, exact, peaks))
    return {"cde_loss": float(t1.mean() - 2 * t2.mean()), "int_p2_grid": float(t1.mean()),
            "int_p2_exact": float(exact.mean()), "p_at_ztrue": float(t2.mean()),
            "cde_loss_exact_int": float(exact.mean() - 2 * t2.mean()),
            "pit_ks": ks_uniform(np.concatenate(pit)), "local_maxima_median": float(np.median(peaks)),
            "local_maxima_mean": float(peaks.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="stack.py output folder with <key>_model.pkl")
    p.add_argument("--key", default="embed_x3")
    p.add_argument("--basis-spacing", type=float, default=2.0)
    p.add_argument("--stem", default="embed_widthcal_dc2")
    p.add_argument("--results", default=str(HERE / "results"))
    a = p.parse_args(argv)
    from rail.deepz.calibration import fit_sigma_scale, ks_uniform
    from rail.deepz.pdf import fixed_grid_pit
    from rail.estimation.algos.deepz_embed import fit_basis_width_factor

    from rail.core.data import TableHandle

    from rail.deepz.modelfile import load_model
    from rail.evaluation import deepz_registry as reg

    ds, val, test, _, n_val, _ = split_dataset("dc2")
    z_val = np.asarray(val[ds.redshift_col], dtype=np.float64)
    z_test = np.asarray(test[ds.redshift_col], dtype=np.float64)
    # the benchmark's qp files hold the PDFs sampled on a grid (interp): the mixture weights
    # come from estimating the same model again as qp.mixmod (no SOM ancil needed)
    spec = reg.get(a.key)
    _, est_cfg = spec.make_configs(ds, False)
    mix_path = Path(a.dir) / f"{a.key}_mixmod_{a.stem}.hdf5"
    est = spec.estimator_class.make_stage(name=f"widthcal_{a.key}", model=load_model(str(Path(a.dir) / f"{a.key}_model.pkl")),
                                          output=str(mix_path), **{**est_cfg, "qp_representation": "mixmod",
                                                                   "som_flags": False})
    est.estimate(TableHandle("input", data={k: np.array(v) for k, v in ds.test.items()}))
    w_all, centers, sigma = read_fixed_grid(mix_path)
    w_val, w_test = w_all[:n_val], w_all[n_val:]
    grid = np.broadcast_to(centers, w_val.shape)
    factors = {"none (f = 1)": 1.0,
               "former pit_ks (unbounded)": fit_sigma_scale(w_val, grid, np.full(w_val.shape, sigma), z_val),
               "pit_ks (bounded)": fit_basis_width_factor(w_val, centers, sigma, z_val, a.basis_spacing)}
    rows = {}
    for label, f in factors.items():
        r = scores(w_test, centers, sigma * f, z_test, ds.zmin, ds.zmax)
        r["factor"] = f
        r["width"] = sigma * f
        r["spacing_in_widths"] = float((centers[1] - centers[0]) / (sigma * f))
        r["val_pit_ks"] = ks_uniform(fixed_grid_pit(w_val, centers, sigma * f, z_val))
        rows[label] = r
        print(f"[widthcal] {label}: {r}", flush=True)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    report = {"benchmark": "embed_widthcal", "date": when, "git_commit": git_commit(), "dir": a.dir, "key": a.key,
              "n_val": int(len(z_val)), "n_test": int(len(z_test)), "basis_width": sigma,
              "basis_spacing": float(centers[1] - centers[0]), "rows": rows}
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.stem}.json").write_text(json.dumps(report, indent=2))
    cols = ["factor", "spacing_in_widths", "val_pit_ks", "pit_ks", "cde_loss", "int_p2_grid", "int_p2_exact",
            "p_at_ztrue", "local_maxima_median", "local_maxima_mean"]
    lines = [f"# The embedding MDN's width factor on DC2 ({a.key})", "",
             f"{when}, commit {report['git_commit']}; PDFs of `{a.key}` (its model in {a.dir}: {len(z_val)} "
             f"stack-validation rows for the fit, {len(z_test)} test rows scored); basis: {len(centers)} Gaussians of "
             f"width {sigma:.5f}, {centers[1] - centers[0]:.5f} apart. CDE loss = int_p2_grid - 2 p_at_ztrue (RAIL's "
             "301-point grid); int_p2_exact = the closed form; local maxima on a 0.001 grid.", "",
             "| calibration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    (out / f"{a.stem}.md").write_text("\n".join(lines) + "\n")
    print(f"[widthcal] wrote {out / (a.stem + '.json')} and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
