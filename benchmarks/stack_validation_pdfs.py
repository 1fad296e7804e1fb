"""The fitted stacks applied to their own stack-validation rows (in-sample PDFs).

``benchmarks/point_estimates.py --validation-estimate`` chooses a point-estimate kind on the
validation rows; for the stacks of ``benchmarks/stack.py`` those rows are the ones the stack
was fitted on, so the choice is made in-sample (still never on the test rows). This writes,
for each stack model ``<out>/<label>.pkl``, ``<out>/<label>_val.hdf5``: the stack applied to
the inputs' ``<key>_val.hdf5`` files and ``<out>/val_table.hdf5`` (what stack.py leaves).

    python benchmarks/stack_validation_pdfs.py --out benchmarks/out/accuracy_boss_ensembles \
        --labels stack_logscore,stack_crps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="stack.py's folder (<label>.pkl, <key>_val.hdf5, val_table.hdf5)")
    p.add_argument("--labels", required=True, help="comma list of fitted stack labels")
    a = p.parse_args(argv)
    from rail.core.data import TableHandle

    from rail.deepz.modelfile import load_model
    from rail.estimation.algos import deepz_stack as dst

    out = Path(a.out)
    for label in [x.strip() for x in a.labels.split(",") if x.strip()]:
        model = load_model(str(out / f"{label}.pkl"))
        inputs = {k: str(out / f"{k}_val.hdf5") for k in model["inputs"]}
        target = out / f"{label}_val.hdf5"
        est = dst.DeepzStackEstimator.make_stage(name=f"stack_val_{label}", model=model, inputs=inputs,
                                                 hdf5_groupname="", output=str(target))
        est.estimate(TableHandle("input", path=str(out / "val_table.hdf5")))
        print(f"[stack-val] {label}: {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
