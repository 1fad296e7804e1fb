"""Training time of the DC2 informers alone and beside busy CPU-bound processes.

What it measures
----------------
For each level of competing load (``--busy``, default 0, 1 and 3 busy processes) and each
estimator (``--estimators``, default ``nnc,lstm,embed,flexzboost``), it starts that many
busy processes (pure-Python spin loops, each stopping by itself after ``--busy-max-s``
seconds and stopped as soon as the run ends), waits ``--settle-s`` seconds, and trains the
estimator's informer on the DC2 training file of pz-rail-base (``rail.deepz.datasets.load_dc2``:
10,225 objects; ``--n-train`` draws a random subset) with the registry's options
(``rail.evaluation.deepz_registry``), in a fresh child process. The child reports the wall
time of ``inform`` and the torch thread count the stage ran with.

The torch informers are run with each ``--thread-modes`` entry:
``auto`` (``num_threads=0``: rail.deepz's automatic choice, which lowers the thread count
when other processes keep CPUs busy) and ``all`` (``num_threads`` = the CPUs this process
may use: the behaviour before the thread policy). FlexZBoost has no such option and runs
once per load level. The slowdown of a run is its time divided by the time of the same
estimator and mode with no busy process; the goal of issue 15 is at most 3x beside three
busy processes, where FlexZBoost is ~2.4x.

Results: ``under_load.json`` (each run with the machine, date, commit, the 1-minute load
average before it and the busy count) and the table ``under_load.md`` in ``--results-dir``
(default ``benchmarks/results``). Run it on an otherwise quiet machine: the load of other
users adds to the busy processes and the table then says nothing about the policy.

    python benchmarks/under_load.py                    # the full benchmark (registry epochs)
    python benchmarks/under_load.py --quick --results-dir /tmp/ul   # smoke test: 300 rows, 2 epochs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed_memory import cpu_name, git_commit  # noqa: E402  (one copy of the provenance helpers)

DEFAULT_ESTIMATORS = "nnc,lstm,embed,flexzboost"

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import torch
from rail.deepz.datasets import load_dc2
from rail.evaluation.deepz_registry import get
spec = get(args["key"])
ds = load_dc2(n_train=args["n_train"])
inform, _ = spec.make_configs(ds, quick=args["quick"])
opts = spec.informer_class.config_options
for k in ("epochs", "ae_epochs"):
    if k in opts and args["epochs"]:
        inform[k] = min(int(inform.get(k, opts[k].default)), args["epochs"])
if "progress" in opts:
    inform["progress"] = False
if "num_threads" in opts and args["num_threads"] is not None:
    inform["num_threads"] = args["num_threads"]
seen = []
if "num_threads" in opts:  # record the thread count the stage ran with
    import rail.deepz.training as tr
    real = tr.choose_num_threads
    def spy(n=0):
        out = real(n)
        seen.append(out)
        return out
    tr.choose_num_threads = spy
inf = spec.informer_class.make_stage(name="under_load_" + args["key"], model=args["model"], **inform)
t0 = time.perf_counter()
inf.inform(ds.train)
dt = time.perf_counter() - t0
print("RESULT " + json.dumps({"inform_s": dt, "train_rows": len(ds.train[ds.redshift_col]),
                              "threads": seen[0][0] if seen else None, "why": seen[0][1] if seen else "",
                              "torch_threads_default": torch.get_num_threads()}), flush=True)
"""

BUSY = "import time\nend = time.time() + {s}\nx = 0\nwhile time.time() < end:\n    x += 1\n"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def start_busy(n: int, max_s: float) -> list:
    return [subprocess.Popen([sys.executable, "-c", BUSY.format(s=max_s)]) for _ in range(n)]


def stop_busy(procs: list) -> None:
    for p in procs:  # only the processes started here, by their handle
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            p.kill()
            p.wait()


def run_child(key: str, model: Path, n_train, epochs, quick: bool, num_threads, timeout: float) -> dict:
    payload = json.dumps({"key": key, "model": str(model), "n_train": n_train, "epochs": epochs, "quick": quick,
                          "num_threads": num_threads})
    env = dict(os.environ)
    env.pop("DEEPZ_NUM_THREADS", None)  # the stage's option decides
    res = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, env=env,
                         timeout=timeout)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"{key}: child failed (rc {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return json.loads(line[0][7:])


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Informer training time beside busy processes (`benchmarks/under_load.py`)",
        "",
        f"{report['date']}, commit {report['git_commit']}; {m['platform']}, {m['cpu']}, "
        f"{m['usable_cpus']} usable CPUs, torch {m['torch']}; 1-minute load average at start "
        f"{m['load_average_1min_at_start']:.2f}; DC2 training rows {report['runs'][0]['train_rows'] if report['runs'] else '?'}"
        f"{', QUICK smoke test (not a measurement)' if report['settings']['quick'] else ''}.",
        "",
        "Slowdown = time / time of the same estimator and thread mode with no busy process. "
        "`auto`: num_threads=0 (rail.deepz's choice); `all`: num_threads = usable CPUs.",
        "",
        "| estimator | threads | busy | load (1 min) before | torch threads used | inform (s) | slowdown |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = {(r["key"], r["mode"]): r["inform_s"] for r in report["runs"] if r["busy"] == 0}
    for r in report["runs"]:
        b = base.get((r["key"], r["mode"]))
        slow = f"{r['inform_s'] / b:.2f}x" if b else "-"
        lines.append(f"| {r['key']} | {r['mode']} | {r['busy']} | {r['load_before']:.2f} | "
                     f"{r['threads'] if r['threads'] is not None else '-'} | {r['inform_s']:.1f} | {slow} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", default=DEFAULT_ESTIMATORS)
    p.add_argument("--busy", default="0,1,3", help="numbers of busy processes beside each run")
    p.add_argument("--thread-modes", default="auto,all", help="torch informers: 'auto' and/or 'all'")
    p.add_argument("--n-train", type=int, default=None, help="random subset of the DC2 training file")
    p.add_argument("--epochs", type=int, default=None, help="cap the registry's epochs")
    p.add_argument("--busy-max-s", type=float, default=3600.0, help="each busy process stops itself after this")
    p.add_argument("--settle-s", type=float, default=3.0, help="wait after starting the busy processes")
    p.add_argument("--timeout-s", type=float, default=7200.0, help="per informer run")
    p.add_argument("--quick", action="store_true", help="smoke test: 300 rows, 2 epochs, registry quick configs")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.n_train = args.n_train or 300
        args.epochs = args.epochs or 2
        args.busy_max_s = min(args.busy_max_s, 120.0)
        args.settle_s = min(args.settle_s, 1.0)
    levels = [int(x) for x in args.busy.split(",")]
    modes = args.thread_modes.split(",")
    if set(modes) - {"auto", "all"}:
        raise SystemExit(f"--thread-modes: 'auto' and/or 'all', got {args.thread_modes!r}")
    from rail.evaluation.deepz_registry import get

    keys = args.estimators.split(",")
    specs = {k: get(k) for k in keys}
    work = Path(args.results_dir) / "under_load_work"
    work.mkdir(parents=True, exist_ok=True)
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
              "machine": machine_info(), "data": "DC2 training file of pz-rail-base",
              "settings": {k: v for k, v in vars(args).items() if k != "results_dir"}, "runs": []}
    ncpu = usable_cpus()
    for busy in levels:
        for key in keys:
            torch_stage = "num_threads" in specs[key].informer_class.config_options
            for mode in (modes if torch_stage else ["-"]):
                nt = None if not torch_stage else (0 if mode == "auto" else ncpu)
                procs = start_busy(busy, args.busy_max_s)
                try:
                    time.sleep(args.settle_s if busy else 0.0)
                    load = os.getloadavg()[0]
                    res = run_child(key, work / f"{key}_model.pkl", args.n_train, args.epochs, args.quick, nt,
                                    args.timeout_s)
                finally:
                    stop_busy(procs)
                run = {"key": key, "mode": mode, "busy": busy, "load_before": load, **res}
                report["runs"].append(run)
                print(f"[under_load] {key:10s} threads={mode:4s} busy={busy} load={load:.2f} "
                      f"-> {res['inform_s']:.1f} s ({res['threads']} torch threads)", flush=True)
    out = Path(args.results_dir)
    (out / "under_load.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "under_load.md").write_text(markdown(report))
    print(markdown(report))
    for f in work.glob("*"):
        f.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
