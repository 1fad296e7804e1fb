"""Adopt deep-ensemble models an earlier run trained without a provenance record, after checking them.

``stack.py --reuse`` reuses only rows with a matching ``<key>_provenance.json``. Models left in
a scratch folder by an earlier run of the same benchmark carry no such record; this script
checks one, and only if every check passes writes its qp files and record into ``--out``:

1. **Training**: the ensemble's member 1 is trained with the same seed, rows and options as
   the single model of the same method (``nnc_x3`` member 1 = ``nnc``). The single has just
   been retrained in ``--out`` by ``stack.py`` (its provenance recorded). Seeded CPU training
   is deterministic at a fixed thread count: at the same count member 1's weights, history
   and settings equal the single's ("identical"). At another thread count sums are rounded
   in another order, the first epoch's losses differ at the 1e-8 (embedding MDN, LSTM) to
   3e-5 (NNC's wide layers) level and the trainings then drift apart; accepted as
   "rounding" when the first epoch's train and validation losses agree to 1e-4 relative and
   the settings (architecture, photometry, bins, encoder settings) are equal; the measured
   agreement is recorded. The other members
   differ only by their seed.
2. **Estimation**: the stored model is estimated again, with the current code, on the same
   rows (stack validation + test); the stored qp file must be reproduced (max |difference| of
   every data and ancil array, relative to its largest value, at most ``--atol``: float32
   rounding at another thread count is ~1e-7). The new qp file, not the stored one, is
   cut into ``<key>_val/_test.hdf5`` in ``--out``.

The record says what was checked and that the inform time is the sum of the members'
training loops recorded in the model (from the earlier run, at its load), not a timing of
this run.

    python benchmarks/adopt_rows.py --source benchmarks/out/accuracy_dc2_ensembles \
        --out benchmarks/out/final --pair nnc_x3=nnc --pair lstm_x3=lstm --pair embed_x3=embed
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import git_commit  # noqa: E402
from stack import row_fingerprint, split_dataset, split_file  # noqa: E402

# entries that depend on the number of members or on the pooled validation outputs
POOLED = {"state_dict", "member_state_dicts", "n_members", "members_train", "ensemble_diagnostics", "format_version",
          "temperature", "sigma_scale", "som", "train"}


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _close(a, b, rtol: float) -> bool:
    """``_equal`` with floats and tensors compared to ``rtol`` (relative)."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=0.0))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, (float, np.floating, np.ndarray)) and isinstance(b, (float, np.floating, np.ndarray)):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=0.0))
    return _equal(a, b)


def _histories(model: dict, member: bool) -> dict:
    """The per-epoch training records of a model: its (member 1's) network and, where it learns
    one, its encoder."""
    out = {"network": (model["members_train"][0] if member else model["train"])["history"]}
    if isinstance(model.get("encoder"), dict) and model["encoder"].get("history"):
        out["encoder"] = model["encoder"]["history"]
    return out


def check_training(ens: dict, single: dict, epochs: int = 1, rtol: float = 1e-4) -> tuple[str, list[str]]:
    """How member 1 of ``ens`` compares with the retrained ``single``: ``("identical", [])`` when
    its weights, training record and settings are equal; ``("rounding", [])`` when they are
    not, but the training records of the first ``epochs`` epochs (train and validation loss
    and learning rate, of the network and of a learned encoder) agree to ``rtol`` and the
    settings that do not come from training are equal: the same computation, with sums
    rounded in another order (another torch thread count), after which the trainings drift
    apart as any two trainings do; ``("", reasons)`` otherwise."""
    from rail.deepz.ensemble import member_state_dicts

    bad = []
    # a learned encoder's embedding, and the scalers fitted on it, are training outputs
    learned = {"scalers", "encoder"} if "encoder" in _histories(single, False) else set()
    for k in sorted((set(ens) | set(single)) - POOLED - learned - {"package_version"}):
        if not _equal(ens.get(k), single.get(k)):
            bad.append(f"model entry {k!r} differs")
    for k in sorted(learned & (set(ens) | set(single))):
        a, b = ens.get(k), single.get(k)
        if isinstance(a, dict) and isinstance(b, dict):  # the encoder's settings (not its weights) must match
            a = {x: y for x, y in a.items() if x not in ("state_dict", "history", "scaler")}
            b = {x: y for x, y in b.items() if x not in ("state_dict", "history", "scaler")}
        if not _equal(a, b) and k == "encoder":
            bad.append(f"model entry {k!r} differs in its settings")
    h_e, h_s = _histories(ens, True), _histories(single, False)
    if h_e.keys() != h_s.keys():
        bad.append(f"training records {sorted(h_e)} vs {sorted(h_s)}")
    if bad:
        return "", bad
    first = member_state_dicts(ens, "ensemble")[0]
    t_e, t_s = ens["members_train"][0], single["train"]
    if _equal(first, single["state_dict"]) and all(_equal(t_e.get(k), t_s.get(k)) for k in
                                                   ("history", "best_epoch", "best_val_loss")) and \
            all(_equal(ens.get(k), single.get(k)) for k in learned):
        return "identical", []
    worst = 0.0
    for name in h_e:
        a, b = h_e[name][:epochs], h_s[name][:epochs]
        if len(a) < epochs or len(b) < epochs:
            bad.append(f"{name}: fewer than {epochs} epochs recorded")
        elif not _close(a, b, rtol):
            bad.append(f"{name}: the first {epochs} epochs' losses differ beyond rtol {rtol:g}")
        else:
            worst = max([worst] + [abs(x[k] - y[k]) / max(abs(y[k]), 1e-300) for x, y in zip(a, b)
                                   for k in ("train_loss", "val_loss") if k in x and k in y])
    return ("", bad) if bad else (f"rounding:{worst:.2g}", [])


def max_differences(path_a, path_b) -> dict:
    """Max |a - b| / max |b| of every data/ancil array of two qp files (inf where shapes or keys differ)."""
    import h5py

    out = {}
    with h5py.File(path_a, "r") as fa, h5py.File(path_b, "r") as fb:
        for group in ("meta", "data", "ancil"):
            if group not in fa and group not in fb:
                continue
            keys = set(fa[group]) | set(fb[group]) if group in fa and group in fb else {"(group)"}
            for k in sorted(keys):
                try:
                    a, b = np.asarray(fa[group][k][()]), np.asarray(fb[group][k][()])
                except KeyError:
                    out[f"{group}/{k}"] = float("inf")
                    continue
                if a.shape != b.shape:
                    out[f"{group}/{k}"] = float("inf")
                elif a.dtype.kind in "fiub":
                    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                    both_nan = np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
                    scale = float(np.nanmax(np.abs(b.astype(np.float64)), initial=0.0)) or 1.0
                    out[f"{group}/{k}"] = float(np.max(np.where(both_nan, 0.0, d), initial=0.0)) / scale
                else:
                    out[f"{group}/{k}"] = 0.0 if np.array_equal(a, b) else float("inf")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder of the earlier run (<key>_model.pkl, <key>.hdf5)")
    p.add_argument("--out", required=True, help="this run's folder (the singles retrained there by stack.py)")
    p.add_argument("--pair", action="append", required=True, help="ensemble=single, e.g. nnc_x3=nnc")
    p.add_argument("--data", default="dc2", choices=("dc2", "boss"))
    p.add_argument("--quick", action="store_true", help="the --quick split and configurations (smoke test)")
    p.add_argument("--atol", type=float, default=1e-6, help="largest difference accepted in step 2, relative to "
                   "the array's largest |value| (float32 rounding of another thread count: ~1e-7)")
    p.add_argument("--load-note", default="", help="recorded with the re-estimation time")
    a = p.parse_args(argv)

    from rail.core.data import TableHandle

    from rail.deepz.modelfile import load_model
    from rail.evaluation import deepz_registry as reg

    src, out = Path(a.source), Path(a.out)
    ds, _val, _test, fit_idx, n_val, n_test = split_dataset(a.data, a.quick)
    split = {"data": a.data, "split_seed": 0, "n_fit": int(len(fit_idx)), "n_stack_validation": n_val,
             "n_test": n_test}
    failed = 0
    for item in a.pair:
        key, _, single_key = item.partition("=")
        spec, sspec = reg.get(key), reg.get(single_key)
        srec = json.loads((out / f"{single_key}_provenance.json").read_text())
        if srec["fingerprint"] != row_fingerprint(sspec, ds, a.quick, split):
            print(f"[adopt] {key}: the single {single_key} in {out} is not from the current code/split: not adopted")
            failed += 1
            continue
        ens = load_model(str(src / f"{key}_model.pkl"))
        single = load_model(str(out / f"{single_key}_model.pkl"))
        level, bad = check_training(ens, single)
        if bad:
            print(f"[adopt] {key}: NOT adopted: " + "; ".join(bad), flush=True)
            failed += 1
            continue
        if level == "identical":
            same = f"member 1 bit-identical to {single_key} retrained here"
        else:
            same = (f"member 1 not bit-identical to {single_key} retrained here, but its first epoch's train and "
                    f"validation losses agree to {float(level.split(':')[1]):.1g} relative (accepted below 1e-4), "
                    "settings equal: the same computation rounded in another order (as at another torch thread count; "
                    "the earlier run's count is unrecorded), after which the trainings drift apart")
        print(f"[adopt] {key}: {same}", flush=True)
        _, est_cfg = spec.make_configs(ds, a.quick)
        est_cfg = {**est_cfg, "chunk_size": est_cfg.get("chunk_size", 10_000)}
        new_path = out / f"{key}.hdf5"
        est = spec.estimator_class.make_stage(name=f"adopt_{key}", model=ens, output=str(new_path), **est_cfg)
        t0 = time.perf_counter()
        est.estimate(TableHandle("input", data={k: np.array(v) for k, v in ds.test.items()}))
        t_est = time.perf_counter() - t0
        diffs = max_differences(src / f"{key}.hdf5", new_path)
        worst = max(diffs.values()) if diffs else float("inf")
        if not worst <= a.atol:
            print(f"[adopt] {key}: NOT adopted: re-estimation differs from the stored qp file by up to {worst:g} "
                  f"({ {k: v for k, v in diffs.items() if v > a.atol} })", flush=True)
            new_path.unlink(missing_ok=True)
            failed += 1
            continue
        split_file(new_path, n_val, out / f"{key}_val.hdf5", out / f"{key}_test.hdf5")
        shutil.copy2(src / f"{key}_model.pkl", out / f"{key}_model.pkl")
        trained = _dt.datetime.fromtimestamp((src / f"{key}_model.pkl").stat().st_mtime, _dt.timezone.utc)
        inform_s = float(sum(r["seconds"] for r in ens["members_train"]))
        verification = (f"adopted from {src} (model written {trained.isoformat(timespec='seconds')}, no provenance "
                        f"record): {same}; re-estimated with the current code, max |difference| from the stored "
                        f"qp file {worst:.2g} of the largest value")
        rec = {"fingerprint": row_fingerprint(spec, ds, a.quick, split), "git_commit": "unrecorded (earlier run)",
               "date": trained.isoformat(timespec="seconds"), "verification": verification,
               "adopted_by_commit": git_commit(),
               "timings": {"inform_time_s": inform_s, "estimate_time_s": t_est, "n_train": int(len(fit_idx)),
                           "n_test": n_val + n_test,
                           "note": "inform = sum of the members' training loops recorded in the model (earlier run, "
                                   "its own load); estimate = the re-estimation here" + (f" ({a.load_note})"
                                                                                         if a.load_note else "")},
               "load_note": a.load_note}
        (out / f"{key}_provenance.json").write_text(json.dumps(rec, indent=2, default=float))
        print(f"[adopt] {key}: adopted ({verification})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
