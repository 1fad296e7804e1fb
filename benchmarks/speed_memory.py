"""Estimation throughput and peak memory of every registered deep estimator, streamed from disk.

What it measures
----------------
1. Trains each estimator once on the DC2 training file (10,225 objects) with the
   registry's architecture and options but few epochs (``--train-epochs``, default 3):
   inference cost depends on the network, not on how long it was trained. Or reuses model
   model files from ``--models-dir`` (``<key>_model.pkl``, e.g. from benchmarks/accuracy.py).
2. For each size N (``--sizes``, default 1e5, 1e6, 1e7) writes an HDF5 input of N rows
   resampled from the DC2 test file (benchmarks/make_large_input.py, bounded memory).
3. Runs each estimator's RAIL stage on that file in a *separate process*: the input is
   streamed in ``--chunk-size`` chunks and the qp output is written to disk chunk by chunk
   (RAIL's normal file mode, run as ``ceci`` runs a stage: ``run()`` + ``finalize()``;
   ``estimate()`` would read the whole output back into memory at the end); the child
   reports the wall time of that run (reading, inference, qp conversion, writing; the
   model is loaded before the clock starts), its peak RSS (``ru_maxrss``),
   its RSS after imports + model load, and on CUDA the peak GPU memory. Outputs are
   deleted after each run, and each run starts after ``os.sync()`` (recorded as
   ``sync_before_s``), so that the write-back of an earlier run's output does not slow it.
4. The image CNN (registry entries needing ``images``) runs on synthetic stamps
   (``make_large_input --images``: 6 bands x 16 x 16 pixels) at ``--image-sizes``
   (default 1e4, 1e5) with ``--image-chunk-size`` rows per chunk.

5. ``--metrics``: the metric pass instead, end to end: ``deepz-compare --truth T --estimate
   a=F --no-plots --quiet`` in a separate process on synthetic qp files of each
   representation (``--metric-kinds``, default ``hist:600`` (NNC's bins), ``interp:301``
   (FlexZBoost's grid), ``mixmod:15`` (the LSTM's components)) at ``--metric-sizes`` (default
   1e5, 1e6) objects, with ``object_id`` on both sides (so the id check runs too). Reports the
   process wall time (imports included), the metric pass alone, objects/s and peak RSS, to
   ``benchmarks/results/speed_metrics.json`` / ``.md``. ``--metric-file F`` adds a real
   estimate file (a stage's hist/interp/mixmod output) tiled to each size: the synthetic
   mixtures' widths (0.02-0.3) are wider than a trained network's, which decides which
   closed forms apply.

Estimators: every registry entry that is not a baseline and needs only ``catalog``
(``nnc``, ``lstm``, ``embed``... whatever is registered), plus those needing images.
The estimate configuration is the registry's with the stage's default output
representation (the harness's ``qp_representation``/``nzbins`` grids exist for metrics);
change options with ``--set key.option=value``. If a run's output (extrapolated from the
smallest run of that estimator) would not fit on the work disk, the run is skipped and
says so.

    python benchmarks/speed_memory.py                           # everything, CPU
    python benchmarks/speed_memory.py --sizes 1e5 --estimators nnc --threads 2
    python benchmarks/speed_memory.py --device cuda --set nnc.mixed_precision=true
    python benchmarks/speed_memory.py --table                   # rewrite (and print) the markdown table from the JSON
    python benchmarks/speed_memory.py --metrics --metric-sizes 1e5,1e6 --threads 2

Results are merged into ``benchmarks/results/speed_memory.json`` (one entry per estimator,
rows and device, each with machine, date, commit, settings) and the table is rewritten in
``benchmarks/results/speed_memory.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGETS = {"catalog": 50_000, "images": 2_000, "metrics": 50_000}  # objects/s on CPU (issues 7, 20)

CHILD = r"""
import json, os, resource, sys, time
import torch
spec_json = json.loads(sys.argv[1])
threads = int(spec_json["threads"])
if threads > 0:
    torch.set_num_threads(threads)
from rail.core.data import TableHandle
from rail.evaluation.deepz_registry import get
spec = get(spec_json["key"])
est = spec.estimator_class.make_stage(name="bench_" + spec_json["key"], model=spec_json["model"],
                                      output=spec_json["output"], **spec_json["config"])
t0 = time.perf_counter()
est.open_model(**est.config)            # load + build the network (not timed separately below)
t_load = time.perf_counter() - t0
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
dev = est.torch_device
if dev is not None and dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
t0 = time.perf_counter()
# what `ceci` / a pipeline does (CatEstimator.estimate() would also read the whole output
# back into memory at the end, which defeats streaming for 1e7 rows)
# do_read=False: the input is iterated chunk by chunk, never read whole (set_data reads by default)
est.set_data("input", TableHandle("input", path=spec_json["input"]), do_read=False)
est.validate()
est.run()
est.finalize()
if dev is not None and dev.type == "cuda":
    torch.cuda.synchronize(dev)
wall = time.perf_counter() - t0
out = {
    "wall_s": wall, "model_load_s": t_load,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_after_load_mb": rss_loaded,
    "torch_threads": torch.get_num_threads(),
    "device": str(dev),
    "device_name": torch.cuda.get_device_name(dev) if dev is not None and dev.type == "cuda" else platform_cpu(),
}
if dev is not None and dev.type == "cuda":
    out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
print("RESULT " + json.dumps(out), flush=True)
"""

CHILD_PRE = r"""
import platform
def platform_cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())
"""


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "load_average_1min_at_start": os.getloadavg()[0],  # > cpu_count: a shared, busy machine
    }


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE.parent,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # pragma: no cover
        return "unknown"


def pick_estimators(requested: str | None):
    from rail.evaluation.deepz_registry import ESTIMATORS

    chosen = []
    for key, spec in ESTIMATORS.items():
        if spec.baseline:
            continue
        if set(spec.needs) - {"catalog", "images"}:
            continue  # e.g. precomputed embeddings: not streamable from a resampled catalog
        chosen.append(spec)
    if requested:
        keys = requested.split(",")
        unknown = [k for k in keys if k not in ESTIMATORS]
        if unknown:
            raise SystemExit(f"unknown estimator(s) {unknown}; registered: {sorted(ESTIMATORS)}")
        chosen = [ESTIMATORS[k] for k in keys]
    return chosen


def parse_sets(items):
    """['nnc.mixed_precision=true', ...] -> {'nnc': {'mixed_precision': True}}."""
    import yaml

    out: dict = {}
    for item in items or []:
        lhs, _, val = item.partition("=")
        key, _, opt = lhs.partition(".")
        if not opt or not _:
            raise SystemExit(f"--set expects key.option=value, got {item!r}")
        out.setdefault(key, {})[opt] = yaml.safe_load(val)
    return out


def image_dataset(ds):
    from rail.deepz.images import add_synthetic_stamps

    ds.train = add_synthetic_stamps(ds.train, ds.bands, ds.mag_limits, size=16, seed=1)
    ds.extra.update(provides=("catalog", "images"), image_col="images", image_bands=list(ds.bands))
    return ds


def train(spec, ds, path: Path, epochs: int, device: str) -> dict:
    """Train ``spec`` on ``ds`` with the registry options, capping the epoch counts."""
    inform, _ = spec.make_configs(ds, quick=False)
    opts = spec.informer_class.config_options
    capped = {}
    for k in ("epochs", "ae_epochs"):
        if k in opts:
            default = inform.get(k, opts[k].default)
            inform[k] = capped[k] = min(int(default), epochs)
    inform.update(device=device, progress=False)
    t0 = time.perf_counter()
    inf = spec.informer_class.make_stage(name=f"bench_inform_{spec.key}", model=str(path), **inform)
    inf.inform(ds.train)
    return {"train_s": time.perf_counter() - t0, "capped": capped, "train_rows": len(ds.train[ds.redshift_col])}


def estimate_config(spec, ds, chunk: int, device: str, sets: dict) -> dict:
    _, cfg = spec.make_configs(ds, quick=False)
    cfg.pop("qp_representation", None)
    cfg.pop("nzbins", None)
    cfg.update(hdf5_groupname="photometry", chunk_size=chunk, id_col="id", device=device)
    cfg.update(sets.get(spec.key, {}))
    return cfg


def run_child(spec_key, model, infile, outfile, cfg, threads, env_extra=None) -> dict:
    payload = json.dumps({"key": spec_key, "model": str(model), "input": str(infile), "output": str(outfile),
                          "config": cfg, "threads": threads})
    env = dict(os.environ)
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(env_extra or {})
    res = subprocess.run([sys.executable, "-c", CHILD_PRE + CHILD, payload], capture_output=True, text=True, env=env)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"child failed (rc {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return json.loads(line[0][7:])


# ----------------------------------------------------------------- the metric pass (issue 20)

METRIC_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from rail.evaluation.deepz_cli import main
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
rc = main(sys.argv[1:])
main_s = time.perf_counter() - t0
cpu_s = time.process_time()  # user + system CPU of all threads, imports included
# VmHWM: this process's own peak (ru_maxrss keeps the parent's peak across fork + exec)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("METRIC_RESULT " + json.dumps({"rc": rc, "import_s": t_import, "main_s": main_s, "cpu_s": cpu_s,
      "peak_rss_mb": peak}))
"""


def write_synthetic_qp(kind: str, size: int, n: int, path: Path, chunk: int = 50_000, seed: int = 0):
    """A qp file of ``n`` PDFs of representation ``kind`` (``size`` bins, grid points or
    components over [0, 3]), written chunk by chunk with h5py in qp's layout (bounded
    memory), with ancil ``zmode`` and ``object_id``. Returns the true redshifts: each drawn
    from its own PDF's main peak (width 0.05) or, for 5%, uniform on [0, 3] (outliers)."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    ztrue = np.empty(n)
    with h5py.File(path, "w") as f:
        meta, data, anc = f.create_group("meta"), f.create_group("data"), f.create_group("ancil")
        meta["pdf_name"] = np.array([kind.encode()])
        meta["pdf_version"] = np.array([0])
        if kind == "hist":
            edges = np.linspace(0.0, 3.0, size + 1)
            meta["bins"] = edges[None]
            x = 0.5 * (edges[1:] + edges[:-1])
            keys = ("pdfs",)
        elif kind == "interp":
            x = np.linspace(0.0, 3.0, size)
            meta["xvals"] = x[None]
            keys = ("yvals",)
        elif kind == "mixmod":
            keys = ("weights", "means", "stds")
        else:
            raise ValueError(f"no synthetic writer for {kind!r}")
        dsets = {k: data.create_dataset(k, (n, size), "f8") for k in keys}
        zmode = anc.create_dataset("zmode", (n,), "f8")
        anc.create_dataset("object_id", data=np.arange(n, dtype=np.int64) + 10_000_000)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            m = e - s
            mu = rng.uniform(0.05, 2.95, m)
            mu2 = rng.uniform(0.05, 2.95, m)
            if kind == "mixmod":
                w = rng.dirichlet(np.full(size, 0.3), m)
                w[:, 0] += 2.0
                w /= w.sum(1, keepdims=True)
                means = np.concatenate([mu[:, None], mu[:, None] + rng.normal(0, 0.3, (m, size - 1))], axis=1)
                dsets["weights"][s:e] = w
                dsets["means"][s:e] = means
                dsets["stds"][s:e] = rng.uniform(0.02, 0.3, (m, size))
            else:
                y = (np.exp(-0.5 * ((x[None] - mu[:, None]) / 0.05) ** 2)
                     + 0.3 * np.exp(-0.5 * ((x[None] - mu2[:, None]) / 0.1) ** 2) + 1e-6)
                dsets[keys[0]][s:e] = y
            zmode[s:e] = mu
            z = mu + rng.normal(0, 0.05, m)
            out = rng.random(m) < 0.05
            ztrue[s:e] = np.clip(np.where(out, rng.uniform(0, 3, m), z), 0.0, 3.0)
    return ztrue


def write_tiled_qp(src: Path, n: int, path: Path, chunk: int = 50_000, seed: int = 0):
    """``src`` (a hist, interp or mixmod qp file written by a stage) repeated to ``n`` rows in
    ``path``, chunk by chunk with h5py (bounded memory): the ``meta`` group as is, every
    ``data`` and one-value-per-row ``ancil`` column tiled, ``object_id`` set to 0..n-1 (other
    id columns dropped: they would repeat). Returns the true redshifts: the ancil ``redshift``
    (the stages copy the truth there when the input has it) or else ``zmode``, each tiled copy
    shifted by N(0, 0.01) so that the rows are not exact repeats."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    ztrue = np.empty(n)
    with h5py.File(src, "r") as f, h5py.File(path, "w") as g:
        f.copy("meta", g)
        m = f["data"][next(iter(f["data"]))].shape[0]
        cols = {f"data/{k}": f["data"][k][()] for k in f["data"]}
        for k in f["ancil"]:
            v = f["ancil"][k]
            if k not in ("id", "object_id", "objectId") and v.shape[:1] == (m,) and v.dtype.kind in "fiu":
                cols[f"ancil/{k}"] = v[()]
        zcol = cols.get("ancil/redshift", cols.get("ancil/zmode"))
        if zcol is None:
            raise ValueError(f"{src}: no ancil 'redshift' or 'zmode' to take the true redshifts from")
        zsrc = np.asarray(zcol, dtype=np.float64).reshape(m)
        dsets = {k: g.create_dataset(k, (n,) + v.shape[1:], v.dtype) for k, v in cols.items()}
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            rows = np.arange(s, e) % m
            for k, v in cols.items():
                dsets[k][s:e] = v[rows]
            ztrue[s:e] = np.clip(zsrc[rows] + rng.normal(0, 0.01, e - s), 0.0, None)
        g.create_dataset("ancil/object_id", data=np.arange(n, dtype=np.int64))
    return ztrue


def _cpu_jiffies() -> list:
    """The machine's CPU time counters (``/proc/stat``'s first line: user, nice, system, idle,
    iowait, irq, softirq, steal, ...), or ``[]`` where there is none. Steal is the time the
    hypervisor gave this VM's virtual CPUs to someone else: a slow run with high steal was a
    busy host, not slow code."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def metric_benchmark(args, info, date, commit, results: Path):
    """Time ``deepz-compare`` on synthetic files of each representation; write the tables."""
    import h5py
    import qp

    kinds = [k.split(":") for k in args.metric_kinds.split(",") if k]
    kinds += [("file", f) for f in args.metric_file]
    sizes = [int(float(s)) for s in args.metric_sizes.split(",") if s]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deepz_metrics_"))
    work.mkdir(parents=True, exist_ok=True)
    jpath, mpath = results / "speed_metrics.json", results / "speed_metrics.md"
    report = json.loads(jpath.read_text()) if jpath.exists() else {"runs": []}
    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
        env["DEEPZ_METRIC_WORKERS"] = str(args.threads)
    new_runs = []
    for kind, size in kinds:
        for n in sizes:
            est, truth = work / f"{kind}_{n}.hdf5", work / f"truth_{kind}_{n}.hdf5"
            t0 = time.perf_counter()
            if kind == "file":
                z = write_tiled_qp(Path(size), n, est)
            else:
                z = write_synthetic_qp(kind, int(size), n, est)
            with h5py.File(est, "r") as f:
                ids = f["ancil"]["object_id"][()]
                pdf_name = f["meta"]["pdf_name"][0].decode()
                ncols = f["data"][next(iter(f["data"]))].shape[1]
            with h5py.File(truth, "w") as f:
                f["redshift"] = z
                f["object_id"] = ids
            qp.read(str(est)) if n <= 10_000 else next(qp.iterator(str(est), chunk_size=1000))  # a valid qp file
            print(f"[metrics] {kind}:{size} N={n:,}: files written in {time.perf_counter() - t0:.1f} s", flush=True)
            os.sync()
            cmd = [sys.executable, "-c", METRIC_CHILD, "--truth", str(truth), "--estimate", f"{kind}={est}",
                   "--out", str(work / "out"), "--no-plots", "--quiet"]
            reps = []
            for _ in range(max(1, args.metric_repeats)):
                load1 = os.getloadavg()[0]
                cpu0, t0 = _cpu_jiffies(), time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall, cpu1 = time.perf_counter() - t0, _cpu_jiffies()
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("METRIC_RESULT ")]
                if proc.returncode != 0 or not line:
                    break
                r = json.loads(line[0].split(" ", 1)[1])
                elapsed = sum(cpu1) - sum(cpu0)  # all the machine's CPU time in the run, idle included
                r.update(wall_s=wall, load_avg_1min=load1,
                         steal_pct=100.0 * (cpu1[7] - cpu0[7]) / elapsed if elapsed > 0 and len(cpu1) > 7 else None)
                reps.append(r)
            if proc.returncode != 0 or not line:
                print(f"[metrics] {kind} N={n:,} FAILED:\n{proc.stderr[-3000:]}", flush=True)
                continue
            # the median run by wall time stands for the repeats; all of them are kept
            r = dict(sorted(reps, key=lambda q: q["wall_s"])[(len(reps) - 1) // 2])
            wall = r["wall_s"]
            if len(reps) > 1:
                r["repeats_wall_s"] = [round(q["wall_s"], 2) for q in reps]
            label, data = f"{kind}:{size}", "synthetic (benchmarks/speed_memory.py write_synthetic_qp, seed 0)"
            if kind == "file":
                label, data = f"{pdf_name}:{ncols} ({Path(size).name})", f"{size} tiled (write_tiled_qp, seed 0)"
            r.update(representation=label, rows=n, wall_s=wall, objects_per_s=n / wall,
                     pass_objects_per_s=n / r["main_s"], date=date, commit=commit, machine=info,
                     threads=args.threads, load=args.load_note,
                     estimate_mb=est.stat().st_size / 2**20,
                     command="deepz-compare --truth T --estimate a=F --no-plots --quiet",
                     data=data)
            new_runs.append(r)
            print(f"[metrics] {label:>4} N={n:>10,}  {wall:7.1f} s  {r['objects_per_s']:9,.0f} obj/s "
                  f"(metric pass + table {r['pass_objects_per_s']:9,.0f}/s)  peak RSS {r['peak_rss_mb']:6,.0f} MB",
                  flush=True)
            est.unlink(missing_ok=True)
            truth.unlink(missing_ok=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    # a run replaces the earlier one of the same representation, size and load note only: a
    # run under load does not overwrite a quiet-machine one
    keyf = lambda r: (r["representation"], r["rows"], r["load"])  # noqa: E731
    replaced = {keyf(r) for r in new_runs}
    report["runs"] = [r for r in report.get("runs", []) if keyf(r) not in replaced] + new_runs
    results.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Metric pass: `deepz-compare --truth T --estimate a=F` end to end", "",
             "Written by `benchmarks/speed_memory.py --metrics`; synthetic qp files, or a stage's output "
             "tiled where the representation names a file (see its docstring); "
             f"target {TARGETS['metrics']:,} objects/s (issue 20). `load` says whether the machine was shared; "
             "`load avg` is the 1-minute load average when the run started and `steal %` the share of the "
             "machine's CPU time the hypervisor gave to other guests during the run (recorded from "
             "2026-12-02 20:15 UTC on; `-` before). With `--metric-repeats`, wall s is the median run and the "
             "others follow in brackets.", "",
             "| representation | objects | wall s | objects/s | pass+table objects/s | CPU s | peak RSS MB | "
             "threads | load | load avg | steal % | machine | commit | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["runs"], key=keyf):
        m = r["machine"]
        cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else "-"
        wall = f"{r['wall_s']:.1f}"
        if r.get("repeats_wall_s"):
            wall += " (" + ", ".join(f"{w:.1f}" for w in r["repeats_wall_s"]) + ")"
        la = f"{r['load_avg_1min']:.1f}" if r.get("load_avg_1min") is not None else "-"
        st = f"{r['steal_pct']:.1f}" if r.get("steal_pct") is not None else "-"
        lines.append(f"| {r['representation']} | {r['rows']:,} | {wall} | {r['objects_per_s']:,.0f} | "
                     f"{r['pass_objects_per_s']:,.0f} | {cpu} | {r['peak_rss_mb']:,.0f} | {r['threads'] or 'default'} | "
                     f"{r['load']} | {la} | {st} | {m['cpu']} x{m['cpu_count']} | {r['commit'][:10]} | {r['date']} |")
    mpath.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def markdown(report: dict) -> str:
    runs = sorted(report["runs"], key=lambda r: (r["kind"], r["estimator"], r["device_name"],
                                                 r["precision"], r["rows"]))
    lines = [
        "# Estimation speed and peak memory",
        "",
        "Streamed from an HDF5 file of DC2 test rows resampled with replacement (image CNN: synthetic "
        "6x16x16 stamps), qp output written to disk chunk by chunk; one fresh process per run. "
        "objects/s = rows / wall time of the stage run (read, inference, qp conversion, write; model loaded before). "
        f"Targets on CPU: catalog >= {TARGETS['catalog']:,} objects/s, images >= {TARGETS['images']:,} stamps/s. "
        "load avg = 1-minute load average when the benchmark started (above the CPU count: a busy, shared "
        "machine, figures are lower bounds). Regenerate: `python benchmarks/speed_memory.py` (table only: `--table`).",
        "",
        "| estimator | device | precision | rows | chunk | threads | wall s | objects/s | target | peak RSS MB | "
        "RSS after load MB | GPU peak MB | output MB/1e5 rows | load avg | date | commit |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        tgt = TARGETS[r["kind"]]
        ok = "-" if r["device"].startswith("cuda") else ("ok" if r["objects_per_s"] >= tgt else f"< {tgt:,}")
        gpu = f"{r['gpu_peak_mb']:,.0f}" if r.get("gpu_peak_mb") is not None else "-"
        per = f"{r['output_mb'] * 1e5 / r['rows']:,.1f}" if r.get("output_mb") else "-"
        lines.append(
            f"| {r['estimator']} | {r['device_name']} | {r['precision']} | {r['rows']:,} | {r['chunk_size']:,} | {r['torch_threads']} | "
            f"{r['wall_s']:,.1f} | {r['objects_per_s']:,.0f} | {ok} | {r['peak_rss_mb']:,.0f} | "
            f"{r['rss_after_load_mb']:,.0f} | {gpu} | {per} | {r['machine'].get('load_average_1min_at_start', 0):.1f} | "
            f"{r['date'][:10]} | {r['commit'][:8]}{'+dirty' if r['commit'].endswith('+dirty') else ''} |"
        )
    # flatness of the peak memory with input size, per estimator and device
    flat = []
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["estimator"], r["device_name"], r["precision"]), {})[r["rows"]] = r["peak_rss_mb"]
    for (key, dev, prec), by_n in groups.items():
        ns = sorted(by_n)
        if len(ns) >= 2:
            flat.append(f"- {key} ({dev}, {prec}): peak RSS " + " -> ".join(f"{by_n[n]:,.0f} MB @ {n:.0e}" for n in ns)
                        + f" (ratio largest/second largest {by_n[ns[-1]] / by_n[ns[-2]]:.2f})")
    if flat:
        lines += ["", "Peak memory vs input size (flat = streaming works):", "", *flat]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="catalog input sizes (rows)")
    p.add_argument("--image-sizes", default="1e4,1e5", help="input sizes for image estimators")
    p.add_argument("--estimators", default=None, help="comma-separated registry keys (default: all deep ones)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'auto' (stage option 'device')")
    p.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads per run (0 = torch default)")
    p.add_argument("--chunk-size", type=lambda s: int(float(s)), default=100_000)
    p.add_argument("--image-chunk-size", type=lambda s: int(float(s)), default=10_000)
    p.add_argument("--train-epochs", type=int, default=3, help="cap on training epochs (speed only)")
    p.add_argument("--models-dir", default=None, help="reuse <key>_model.pkl from here instead of training")
    p.add_argument("--set", action="append", default=[], metavar="KEY.OPTION=VALUE",
                   help="estimate-config override, e.g. nnc.inference_batch_size=262144 (repeatable)")
    p.add_argument("--workdir", default=None, help="inputs, models and outputs (default: a temp dir)")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--table", action="store_true", help="only print/rewrite the markdown from the JSON")
    p.add_argument("--metrics", action="store_true", help="benchmark the metric pass (deepz-compare) instead")
    p.add_argument("--metric-sizes", default="1e5,1e6", help="objects per synthetic estimate file (--metrics)")
    p.add_argument("--metric-kinds", default="hist:600,interp:301,mixmod:15",
                   help="representation:size list (--metrics): bins, grid points or components")
    p.add_argument("--metric-file", action="append", default=[], metavar="QP_FILE",
                   help="--metrics: also a real hist/interp/mixmod qp file (e.g. a stage's output), tiled to "
                        "each size (write_tiled_qp); repeatable")
    p.add_argument("--metric-repeats", type=int, default=1,
                   help="--metrics: runs per file; the median run is recorded, with all runs' wall times")
    p.add_argument("--load-note", default="quiet", help="recorded with --metrics runs, e.g. 'under load'")
    args = p.parse_args(argv)

    results = Path(args.results)
    jpath, mpath = results / "speed_memory.json", results / "speed_memory.md"
    report = json.loads(jpath.read_text()) if jpath.exists() else {"runs": []}
    if "runs" not in report or (report["runs"] and "kind" not in report["runs"][0]):
        report = {"runs": []}  # older format
    for r in report["runs"]:
        r.setdefault("precision", "fp32")  # rows from before the precision column were float32
    if args.table:  # rewrite the markdown table from the JSON (no runs)
        md = markdown(report)
        mpath.write_text(md)
        print(md)
        return

    if args.metrics:
        info = machine_info(args.threads)
        date, commit = _dt.datetime.now().isoformat(timespec="seconds"), git_commit()
        metric_benchmark(args, info, date, commit, results)
        return

    from make_large_input import make_large_input
    from rail.deepz.datasets import load_dc2

    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    image_sizes = [int(float(s)) for s in args.image_sizes.split(",") if s]
    sets = parse_sets(args.set)
    specs = pick_estimators(args.estimators)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deepz_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.threads)
    date, commit = _dt.datetime.now().isoformat(timespec="seconds"), git_commit()
    print(f"[speed] {info['platform']} | {info['cpu']} x{info['cpu_count']} | torch {info['torch']} "
          f"({info['torch_threads']} threads) | GPU: {info['gpu']} | device option {args.device!r} | {date} | "
          f"commit {commit[:12]} | workdir {work}", flush=True)
    notes: set = set()
    new_runs = []
    inputs: dict = {}

    def input_file(n, images):
        key = (n, images)
        if key not in inputs:
            path = work / f"dc2_resampled_{n}{'_images' if images else ''}.hdf5"
            t0 = time.perf_counter()
            make_large_input(n, path, seed=0, images=images)
            print(f"[speed] input {path.name}: {n:,} rows, {path.stat().st_size / 2**20:,.0f} MB, "
                  f"written in {time.perf_counter() - t0:.1f} s", flush=True)
            inputs[key] = path
        return inputs[key]

    for spec in specs:
        images = "images" in spec.needs
        kind = "images" if images else "catalog"
        ds = load_dc2()
        if images:
            ds = image_dataset(ds)
        model = Path(args.models_dir) / f"{spec.key}_model.pkl" if args.models_dir else work / f"{spec.key}_model.pkl"
        train_info = {"models_dir": str(args.models_dir)}
        if not args.models_dir:
            train_info = train(spec, ds, model, args.train_epochs, args.device)
            print(f"[speed] trained {spec.key} on {train_info['train_rows']:,} DC2 rows in "
                  f"{train_info['train_s']:.0f} s (epochs capped: {train_info['capped']})", flush=True)
        elif not model.exists():
            print(f"[speed] skip {spec.key}: no model {model}", flush=True)
            continue
        chunk = args.image_chunk_size if images else args.chunk_size
        cfg = estimate_config(spec, ds, chunk, args.device, sets)
        bytes_per_row = None
        for n in image_sizes if images else sizes:
            infile = input_file(n, images)
            outfile = work / f"{spec.key}_{n}_out.hdf5"
            free = shutil.disk_usage(work).free
            if bytes_per_row is not None and bytes_per_row * n > 0.85 * free:
                msg = (f"{spec.key} at {n:,} rows skipped: its output would take ~{bytes_per_row * n / 2**30:.0f} GiB, "
                       f"{free / 2**30:.0f} GiB free in {work} (use --workdir on a bigger disk or a compact "
                       "output, e.g. --set KEY.qp_representation=mixmod)")
                print("[speed] " + msg, flush=True)
                notes.add(msg)
                continue
            # flush what earlier runs wrote (up to 24 GB for 1e7 rows, deleted but maybe still being
            # written back) so that their disk traffic does not land in this run's time
            t_sync = time.perf_counter()
            os.sync()
            sync_s = time.perf_counter() - t_sync
            try:
                r = run_child(spec.key, model, infile, outfile, cfg, args.threads)
            except RuntimeError as err:
                print(f"[speed] {spec.key} N={n:,} FAILED: {err}", flush=True)
                continue
            out_bytes = outfile.stat().st_size if outfile.exists() else 0
            outfile.unlink(missing_ok=True)
            bytes_per_row = out_bytes / n if out_bytes else bytes_per_row
            r.update(estimator=spec.key, kind=kind, rows=n, chunk_size=chunk, objects_per_s=n / r["wall_s"],
                     sync_before_s=sync_s,
                     precision="bf16" if cfg.get("mixed_precision") else "fp32",
                     output_mb=out_bytes / 2**20, date=date, commit=commit, machine=info,
                     estimate_config={k: v for k, v in cfg.items() if k not in ("bands", "err_bands", "mag_limits")},
                     training=train_info,
                     data="DC2 test file (pz-rail-base) resampled with replacement, seed 0"
                          + ("; synthetic 6x16x16 stamps" if images else ""))
            new_runs.append(r)
            print(f"[speed] {spec.key:6s} {r['device_name'][:30]:30s} N={n:>11,}  {r['wall_s']:8.1f} s  "
                  f"{r['objects_per_s']:10,.0f} obj/s  peak RSS {r['peak_rss_mb']:7,.0f} MB "
                  f"(after load {r['rss_after_load_mb']:5,.0f})  output {r['output_mb']:,.0f} MB", flush=True)
    for path in inputs.values():
        path.unlink(missing_ok=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    keyf = lambda r: (r["estimator"], r["rows"], r["device_name"], r["precision"])  # noqa: E731
    replaced = {keyf(r) for r in new_runs}
    report["runs"] = [r for r in report["runs"] if keyf(r) not in replaced] + new_runs
    report["notes"] = sorted(notes)
    report["description"] = __doc__.split("What it measures")[0].strip()
    results.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    mpath.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
