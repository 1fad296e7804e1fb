"""Write the example ceci pipelines from the estimator registry.

For every estimator registered in :mod:`rail.evaluation.deepz_registry` (and every data set
it supports) this writes ``examples/<key>_<data>.yml`` and
``examples/configs/<key>_<data>_config.yml``: a self-contained pipeline

    DeepzExampleData -> <Informer> -> <Estimator> -> DeepzCompareEvaluator

run from the repository root with ``ceci examples/<key>_<data>.yml``; outputs go under
``out/examples/<key>_<data>/`` (git-ignored). Adding an estimator to the registry and
re-running this script adds its pipeline.

An estimator that needs images (the CNN) on a data set without them gets two
``DeepzSyntheticStamps`` stages (:mod:`rail.evaluation.deepz_stamps`) after the data stage,
which add simulated stamps to the training and test tables:

    DeepzExampleData -> DeepzSyntheticStamps (train, test) -> <Informer> -> <Estimator> -> DeepzCompareEvaluator

Those stamps' sizes follow the true redshift: such a pipeline shows the method running,
its metrics are not a measure of the CNN on real images.

The scene estimator (:mod:`rail.estimation.algos.deepz_scene`) works on images, not on a
catalog: its pipeline (``examples/scene_dc2.yml``, :func:`scene_pipeline`) simulates scenes
from the DC2 tables first (:mod:`rail.evaluation.deepz_scene_stages`):

    DeepzExampleData -> DeepzSceneSimulator (train, test) -> DeepzSceneInformer -> DeepzSceneEstimator
    -> DeepzSceneEvaluator

    python examples/make_pipelines.py                  # full settings, into examples/
    python examples/make_pipelines.py --quick --n-train 500 --n-test 500 --dest /tmp/q
    python examples/make_pipelines.py --keys nnc --data dc2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent

# modules ceci imports to find the stages (rail.deepz imports every deepz estimator)
BASE_MODULES = ["rail.deepz", "rail.evaluation.deepz_stages"]
STAMPS_MODULE = "rail.evaluation.deepz_stamps"
#: side (pixels) of the synthetic stamps of the image pipelines
STAMP_SIZE = 16


def _provides(ds) -> set:
    return set(ds.extra.get("provides", ("catalog",)))


def with_synthetic_stamps(ds):
    """A shallow copy of ``ds`` that says it provides images (column ``images``, one band per
    catalog band): what the data set looks like after the ``DeepzSyntheticStamps`` stages."""
    import copy

    out = copy.copy(ds)
    out.extra = {**ds.extra, "provides": tuple(sorted(_provides(ds) | {"images"})),
                 "image_col": "images", "image_bands": list(ds.bands)}
    return out


def _plain(x):
    """Config values as plain YAML types."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _pipeline(name, config_path, out_root, modules, stages, inputs=None) -> dict:
    """The ceci pipeline dict: mini launcher, one local thread, outputs under ``out_root/name``."""
    return dict(
        config=config_path,
        inputs=dict(inputs or {}),
        log_dir=f"{out_root}/{name}/logs",
        modules=" ".join(modules),
        output_dir=f"{out_root}/{name}",
        resume=False,
        launcher=dict(name="mini", interval=0.5),
        site=dict(name="local", max_threads=1),
        stages=stages,
    )


def _config_ref(cfg_path: Path, rel_to: Path) -> str:
    """The config path as the pipeline file names it: relative to ``rel_to`` (the folder ceci runs in) if below it."""
    try:
        return str(cfg_path.resolve().relative_to(rel_to.resolve()))
    except ValueError:
        return str(cfg_path.resolve())


def pipeline_for(spec, ds, *, quick=False, n_train=0, n_test=0, seed=0, config_path="", out_root="out/examples",
                 stamps=False):
    """(pipeline dict, stage-config dict) for one estimator on one data set.

    ``stamps``: insert the two ``DeepzSyntheticStamps`` stages (``ds`` as returned by
    :func:`with_synthetic_stamps`); the estimator then reads the stamped tables."""
    key, data = spec.key, ds.name
    name = f"{key}_{data}"
    inform_cfg, est_cfg = spec.make_configs(ds, quick)
    mod = spec.informer.split(":")[0]
    modules = BASE_MODULES + ([mod] if not mod.startswith("rail.estimation.algos.deepz_") else [])
    train_tag, test_tag = f"train_{data}", f"test_{data}"
    stamp_stages, stamp_cfg = [], {}
    if stamps:
        modules = modules + [STAMPS_MODULE]
        for part, tag, offset in (("train", train_tag, 0), ("test", test_tag, 1)):
            stage_name = f"stamps_{part}_{data}"
            stamp_stages.append(dict(classname="DeepzSyntheticStamps", name=stage_name, nprocess=1,
                                     aliases=dict(input=tag, output=f"{tag}_stamps")))
            stamp_cfg[stage_name] = dict(bands=list(ds.bands), mag_limits=_plain(dict(ds.mag_limits)),
                                         redshift_col=ds.redshift_col, column="images", size=STAMP_SIZE,
                                         seed=int(seed) + offset)
        train_tag, test_tag = f"{train_tag}_stamps", f"{test_tag}_stamps"
    stages = [
        dict(classname="DeepzExampleData", name=f"data_{data}", nprocess=1),
        *stamp_stages,
        dict(classname=spec.informer.split(":")[1], name=f"inform_{key}", nprocess=1,
             aliases=dict(input=train_tag, model=f"model_{key}")),
        dict(classname=spec.estimator.split(":")[1], name=f"estimate_{key}", nprocess=1,
             aliases=dict(input=test_tag, model=f"model_{key}", output=f"pz_{key}")),
        dict(classname="DeepzCompareEvaluator", name=f"compare_{key}", nprocess=1,
             aliases=dict(input=f"pz_{key}", truth=f"test_{data}", output=f"metrics_{key}")),
    ]
    stages[0]["aliases"] = dict(train=f"train_{data}", test=f"test_{data}")
    pipe = _pipeline(name, config_path, out_root, modules, stages)
    cfg = {
        f"data_{data}": dict(dataset=data, n_train=int(n_train), n_test=int(n_test), seed=int(seed)),
        **stamp_cfg,
        f"inform_{key}": _plain(inform_cfg),
        f"estimate_{key}": _plain(dict(est_cfg, chunk_size=10000)),
        f"compare_{key}": dict(input_label=key, redshift_col=ds.redshift_col, mag_col=ds.ref_band,
                              zmin=float(ds.zmin), zmax=float(ds.zmax), plots=True, progress=True),
    }
    for stage_name, section in cfg.items():  # RAIL takes the instance name from the config
        section["name"] = stage_name
    return pipe, cfg


def write_pipelines(dest: Path = HERE, keys=None, datasets=("dc2", "boss"), quick=False, n_train=0, n_test=0,
                    seed=0, out_root="out/examples", rel_to: Path | None = None) -> list[Path]:
    """Write the pipeline/config YAMLs; returns the pipeline files written."""
    from rail.evaluation import deepz_compare as dc
    from rail.evaluation import deepz_registry as reg

    dest = Path(dest)
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    rel_to = HERE.parent if rel_to is None else Path(rel_to)
    written = []
    for data in datasets:
        try:
            ds = dc.load_dataset(data, 10, 10, seed)  # conventions only; the stage loads the data
        except FileNotFoundError as err:
            print(f"skipping data set {data}: {err}")
            continue
        # (registry variants such as nnc_x3 differ from their base only by options: no example of their own)
        for key in keys or [k for k, s in reg.ESTIMATORS.items() if not s.extra.get("variant_of")]:
            spec = reg.get(key)
            stamps = "images" in spec.needs and "images" not in _provides(ds)
            ds_key = with_synthetic_stamps(ds) if stamps else ds
            why = dc._supported(spec, ds_key)
            if why:
                print(f"skipping {key} on {data}: {why}")
                continue
            name = f"{key}_{data}"
            cfg_path = dest / "configs" / f"{name}_config.yml"
            cfg_ref = _config_ref(cfg_path, rel_to)
            pipe, cfg = pipeline_for(spec, ds_key, quick=quick, n_train=n_train, n_test=n_test, seed=seed,
                                     config_path=cfg_ref, out_root=out_root, stamps=stamps)
            pipe_path = dest / f"{name}.yml"
            pipe_path.write_text(yaml.safe_dump(pipe, sort_keys=False))
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            written.append(pipe_path)
            print(f"wrote {pipe_path} and {cfg_path}")
    return written


SCENE_MODULES = ["rail.deepz", "rail.evaluation.deepz_stages", "rail.evaluation.deepz_scene_stages"]
#: scene-pipeline settings: full (minutes on a laptop CPU, see benchmarks/results/scenes.md) and quick (seconds)
SCENE_SETTINGS = {
    False: dict(n_train_scenes=400, n_test_scenes=100, size=48, n_objects=[4, 8], n_background=[0, 3],
                inform=dict(epochs=30, width=16, hidden=64, batch_size=8), n_boot=100),
    True: dict(n_train_scenes=12, n_test_scenes=6, size=32, n_objects=[3, 5], n_background=[0, 1],
               inform=dict(epochs=1, width=8, hidden=8, batch_size=4), n_boot=5),
}


def scene_pipeline(*, quick=False, seed=0, config_path="", out_root="out/examples", size_law="magnitude"):
    """(pipeline dict, stage-config dict) of the scene estimator on scenes simulated from DC2.

    Two ``DeepzSceneSimulator`` stages draw training and test scenes from the DC2 training and
    test tables (different objects, independent seeds); the informer trains on the training
    scenes and their truth; the estimator detects objects in the test scenes (one PDF per
    detection, matched to the test truth); ``DeepzSceneEvaluator`` writes detection and photo-z
    metrics per blending class. The estimator's optional ``positions`` input (mode
    'positions') is given as ``none``."""
    name = "scene_dc2"
    st = SCENE_SETTINGS[bool(quick)]
    sims = []
    for part in ("train", "test"):
        sims.append(dict(classname="DeepzSceneSimulator", name=f"simulate_{part}_dc2", nprocess=1,
                         aliases=dict(input=f"{part}_dc2", output=f"scenes_{part}_dc2", truth=f"truth_{part}_dc2")))
    stages = [
        dict(classname="DeepzExampleData", name="data_dc2", nprocess=1,
             aliases=dict(train="train_dc2", test="test_dc2")),
        *sims,
        dict(classname="DeepzSceneInformer", name="inform_scene", nprocess=1,
             aliases=dict(input="scenes_train_dc2", truth="truth_train_dc2", model="model_scene")),
        dict(classname="DeepzSceneEstimator", name="estimate_scene", nprocess=1,
             aliases=dict(input="scenes_test_dc2", truth="truth_test_dc2", positions="scene_positions",
                          model="model_scene", output="pz_scene")),
        dict(classname="DeepzSceneEvaluator", name="evaluate_scene", nprocess=1,
             aliases=dict(input="pz_scene", truth="truth_test_dc2", output="metrics_scene")),
    ]
    pipe = _pipeline(name, config_path, out_root, SCENE_MODULES, stages, inputs={"scene_positions": "none"})
    scene = dict(size=st["size"], n_objects=st["n_objects"], n_background=st["n_background"], size_law=size_law)
    cfg = {
        "data_dc2": dict(dataset="dc2", n_train=0, n_test=0, seed=int(seed)),
        "simulate_train_dc2": dict(n_scenes=st["n_train_scenes"], seed=int(seed), **scene),
        "simulate_test_dc2": dict(n_scenes=st["n_test_scenes"], seed=int(seed) + 1, **scene),
        "inform_scene": dict(st["inform"], seed=int(seed), progress=True),
        "estimate_scene": dict(mode="detect", chunk_size=64),
        "evaluate_scene": dict(redshift_col="redshift", mag_col="mag_i_lsst", zmin=0.0, zmax=3.0,
                               n_boot=st["n_boot"], seed=int(seed)),
    }
    for stage_name, section in cfg.items():
        section["name"] = stage_name
    return pipe, cfg


def write_scene_pipeline(dest: Path = HERE, quick=False, seed=0, out_root="out/examples",
                         rel_to: Path | None = None) -> Path:
    """Write ``scene_dc2.yml`` and ``configs/scene_dc2_config.yml`` into ``dest``; returns the pipeline file."""
    dest = Path(dest)
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    rel_to = HERE.parent if rel_to is None else Path(rel_to)
    cfg_path = dest / "configs" / "scene_dc2_config.yml"
    cfg_ref = _config_ref(cfg_path, rel_to)
    pipe, cfg = scene_pipeline(quick=quick, seed=seed, config_path=cfg_ref, out_root=out_root)
    pipe_path = dest / "scene_dc2.yml"
    pipe_path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    cfg_path.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
    print(f"wrote {pipe_path} and {cfg_path}")
    return pipe_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=str(HERE), help="folder for the YAMLs (default: examples/)")
    p.add_argument("--keys", default="", help="comma list of estimator keys (default: all registered, and "
                   "'scene', the scene pipeline)")
    p.add_argument("--data", default="dc2,boss", help="comma list of data sets")
    p.add_argument("--quick", action="store_true", help="quick (seconds) estimator configurations")
    p.add_argument("--n-train", type=int, default=0, help="random training subset (0 = all)")
    p.add_argument("--n-test", type=int, default=0, help="random test subset (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-root", default="out/examples", help="output folder of the pipelines")
    a = p.parse_args(argv)
    keys = [k for k in a.keys.split(",") if k] or None
    catalog_keys = [k for k in keys if k != "scene"] if keys else None
    if catalog_keys != []:
        write_pipelines(Path(a.dest), catalog_keys, [d for d in a.data.split(",") if d], a.quick, a.n_train,
                        a.n_test, a.seed, a.out_root)
    if (keys is None or "scene" in keys) and "dc2" in a.data.split(","):
        write_scene_pipeline(Path(a.dest), a.quick, a.seed, a.out_root)


if __name__ == "__main__":
    main()
