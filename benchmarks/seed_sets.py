"""Does the DC2 result hold for other member seeds? (issue 18) One table over seed sets.

Each seed set is one ``benchmarks/stack.py --refit`` report (``--member-seed-offset K``; the
split, FlexZBoost and BPZ are the same in all) with its ``benchmarks/point_estimates.py`` report
(the point-estimate kind chosen on the stack-validation rows of the 80% members, never on test).
For each stack (``--labels``) and seed set: the four DC2 targets of issue 18 with the zmode
point estimate and with the validation-chosen one (the kind chosen for ``rail_sigma_iqr``; the
same estimate gives the outlier rate; PIT KS and CDE loss are of the PDF, so the same for both),
met or missed; then mean, standard deviation (ddof 1) and range over the seed sets.

    python benchmarks/seed_sets.py \\
        --set 0=results/accuracy_dc2_ensembles_refit.json,results/accuracy_dc2_point_estimates_refit.json \\
        --set 1000=results/accuracy_dc2_ensembles_seed1000.json,results/accuracy_dc2_point_estimates_seed1000.json \\
        --stem accuracy_dc2_seeds
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
from accuracy import git_commit, machine_info  # noqa: E402

# issue 18's DC2 targets: metric -> upper bound (all four: lower is better)
TARGETS = {"rail_sigma_iqr": 0.0175, "rail_outlier_rate": 0.09, "pit_ks": 0.02, "cde_loss": -8.0}
LABELS = "stack_logscore_magbin_refit,stack_logscore_refit,stack_crps_magbin_refit,stack_crps_refit"


def seed_set_row(stack_report: dict, points_report: dict, label: str) -> dict:
    """One seed set's values for stack ``label``: ``zmode`` and ``chosen`` (dicts of the four
    targets' metrics), the chosen kind and its validation sigma_IQR."""
    m = stack_report["metrics"][label]
    pdf = {k: m[k] for k in ("pit_ks", "cde_loss")}
    zmode = {"rail_sigma_iqr": m["rail_sigma_iqr"], "rail_outlier_rate": m["rail_outlier_rate"], **pdf}
    choice = points_report["chosen_on_validation"][label]["rail_sigma_iqr"]
    kind = choice["kind"]
    pm = points_report["metrics"][label][kind]
    chosen = {"rail_sigma_iqr": pm["rail_sigma_iqr"], "rail_outlier_rate": pm["rail_outlier_rate"], **pdf}
    return {"zmode": zmode, "chosen": chosen, "chosen_kind": kind, "chosen_validation_sigma_iqr": choice["validation"]}


def met(values: dict) -> dict:
    """{metric: value <= target} for the four targets."""
    return {k: bool(values[k] is not None and values[k] <= t) for k, t in TARGETS.items()}


def spread(xs) -> dict:
    x = np.asarray(xs, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None,
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", required=True,
                   help="OFFSET=stack report JSON,point-estimates report JSON (one per seed set)")
    p.add_argument("--labels", default=LABELS, help="stacks to tabulate (comma list)")
    p.add_argument("--stem", default="accuracy_dc2_seeds")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--note", default="", help="free text for the report (what was reused, load)")
    a = p.parse_args(argv)
    labels = [x.strip() for x in a.labels.split(",") if x.strip()]
    sets = {}
    for item in a.set:
        off, _, files = item.partition("=")
        sr, pr = files.split(",")
        sets[int(off)] = {"stack_report": sr, "points_report": pr,
                          "stack": json.loads(Path(sr).read_text()), "points": json.loads(Path(pr).read_text())}
    for off, s in sets.items():
        if s["stack"].get("member_seed_offset", 0) != off:
            p.error(f"--set {off}: {s['stack_report']} was made with member_seed_offset "
                    f"{s['stack'].get('member_seed_offset', 0)}")
    rows = {label: {off: seed_set_row(s["stack"], s["points"], label) for off, s in sets.items()} for label in labels}
    summary = {label: {est: {k: spread([r[est][k] for r in by.values()]) for k in TARGETS}
                       for est in ("zmode", "chosen")} for label, by in rows.items()}
    report = {
        "benchmark": "seed_sets", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "machine": machine_info(), "targets": TARGETS, "note": a.note,
        "seed_sets": {off: {"stack_report": s["stack_report"], "points_report": s["points_report"],
                            "stack_commit": s["stack"]["git_commit"], "points_commit": s["points"]["git_commit"],
                            "load_note": s["stack"].get("load_note", ""),
                            "provenance": s["stack"].get("provenance", {})} for off, s in sets.items()},
        "rows": {label: {off: {**r, "met_zmode": met(r["zmode"]), "met_chosen": met(r["chosen"])}
                         for off, r in by.items()} for label, by in rows.items()},
        "summary": summary,
    }
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.stem}.json").write_text(json.dumps(report, indent=2))

    def cell(v, k):
        return f"{v:.5f}" if k in ("rail_sigma_iqr",) else (f"{v:.4f}" if k != "cde_loss" else f"{v:.3f}")

    names = {"rail_sigma_iqr": "sigma_IQR", "rail_outlier_rate": "outlier rate", "pit_ks": "PIT KS",
             "cde_loss": "CDE loss"}
    lines = [f"# DC2 over member seed sets: {a.stem}", "",
             f"{report['date']}, commit {report['git_commit']}. Targets (issue 18): "
             + ", ".join(f"{names[k]} <= {t:g}" for k, t in TARGETS.items()) + ". Seed sets (member seed offset "
             "added to every deep row's stage seed; 0 = the registry's): " + ", ".join(map(str, sets)) + ".", "",
             "Point estimate `zmode` = the stack's ancil zmode; `chosen` = the kind chosen for sigma_IQR on the "
             "stack-validation rows (80% members' PDFs), its test sigma_IQR and outlier rate. PIT KS and CDE loss "
             "are of the PDF. A value in **bold** misses its target.", ""]
    for label in labels:
        lines += [f"## {label}", "", "| seed offset | estimate | kind | " + " | ".join(names[k] for k in TARGETS)
                  + " | all four met |", "|---|---|---|" + "---|" * len(TARGETS) + "---|"]
        for off, r in rows[label].items():
            for est in ("zmode", "chosen"):
                ok = met(r[est])
                kind = "zmode" if est == "zmode" else r["chosen_kind"]
                lines.append(f"| {off} | {est} | {kind} | " + " | ".join(
                    cell(r[est][k], k) if ok[k] else f"**{cell(r[est][k], k)}**" for k in TARGETS)
                    + f" | {'yes' if all(ok.values()) else 'no'} |")
        for est in ("zmode", "chosen"):
            s = summary[label][est]
            lines.append(f"| mean ± sd (min to max), {len(sets)} sets | {est} | | " + " | ".join(
                f"{cell(s[k]['mean'], k)} ± {cell(s[k]['std'], k) if s[k]['std'] is not None else '-'} "
                f"({cell(s[k]['min'], k)} to {cell(s[k]['max'], k)})" for k in TARGETS) + " | |")
        lines.append("")
    if a.note:
        lines += ["## Provenance", "", a.note, ""]
    (out / f"{a.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
