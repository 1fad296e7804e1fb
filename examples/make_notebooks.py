"""Regenerate examples/compare_dc2.ipynb, compare_boss.ipynb, compare_catalogue.ipynb and scene_dc2.ipynb (run from the repository root).

The compare notebooks drive rail.evaluation.deepz_compare.compare(); scene_dc2 runs the scene stages.
DEEPZ_NOTEBOOK_QUICK=1 makes them a smoke run (tests/test_evaluation.py and, for scene_dc2,
tests/test_pipelines.py execute them that way with nbclient).
"""
import nbformat as nbf
from pathlib import Path

def nb(data, title, intro, guard):
    c = []
    c.append(nbf.v4.new_markdown_cell(f"# {title}\n\n{intro}\n\n"
        "Every estimator registered in `rail.evaluation.deepz_registry` that can run on this data set is trained "
        "(inform) on the training table and run (estimate) on the test table; `compare()` streams the qp "
        "estimates chunk by chunk through the metrics of `rail.evaluation.deepz_metrics` and writes a tidy table "
        "(`metrics.csv`, `metrics.hdf5`) and plots.\n\n"
        "Set `DEEPZ_NOTEBOOK_QUICK=1` for a smoke run (quick configurations, small random subsets; the numbers "
        "are then meaningless); `DEEPZ_NOTEBOOK_ESTIMATORS` picks estimators (comma list, default `all`)."))
    c.append(nbf.v4.new_code_cell(
        "import os\nfrom pathlib import Path\n\nimport pandas as pd\nfrom IPython.display import Image, display\n\n"
        "from rail.evaluation.deepz_compare import compare, format_table\nfrom rail.evaluation import deepz_registry\n\n"
        "QUICK = os.environ.get('DEEPZ_NOTEBOOK_QUICK', '0') == '1'\n"
        "ESTIMATORS = os.environ.get('DEEPZ_NOTEBOOK_ESTIMATORS', 'all')\n"
        f"OUTDIR = Path(os.environ.get('DEEPZ_NOTEBOOK_OUT', '../out/notebooks' if Path.cwd().name == 'examples' else 'out/notebooks')) / ('{data}' + ('_quick' if QUICK else ''))\n"
        "N = dict(n_train=600, n_test=600) if QUICK else {}\n"
        "print('registered estimators:', list(deepz_registry.ESTIMATORS), '| quick:', QUICK)"))
    if guard:
        c.append(nbf.v4.new_code_cell(
            "from rail.deepz.datasets import require_shared\n\ntry:\n    require_shared('sdss_boss_dr10')\n    HAVE_DATA = True\n"
            "except FileNotFoundError as err:\n    HAVE_DATA = False\n    print('SDSS BOSS data not found, the rest of this notebook is skipped:', err)"))
        g = "if HAVE_DATA:\n"
        ind = "    "
    else:
        c.append(nbf.v4.new_code_cell("HAVE_DATA = True"))
        g, ind = "", ""
    def guarded(code):
        if not guard:
            return code
        return g + "\n".join(ind + l if l else l for l in code.splitlines())
    c.append(nbf.v4.new_markdown_cell("## Train, estimate and evaluate"))
    c.append(nbf.v4.new_code_cell(guarded(
        f"result = compare(data='{data}', estimators=ESTIMATORS, outdir=OUTDIR, quick=QUICK, **N)")))
    c.append(nbf.v4.new_markdown_cell("## Overall metrics\n\nsigma_nmad = 1.4826 median(|dz|/(1+z)); eta = fraction with |dz|/(1+z) > 0.15; "
        "bias = median(dz/(1+z)); rail_* are RAIL's point metrics; crps = mean CRPS; pco = fraction of true redshifts outside "
        "the central 99% interval; pit_* from qp's PIT; times in seconds on this machine."))
    c.append(nbf.v4.new_code_cell(guarded("display(result.overall())")))
    c.append(nbf.v4.new_markdown_cell("## Metrics in bins of true redshift and of magnitude"))
    c.append(nbf.v4.new_code_cell(guarded(
        "t = result.table\nbinned = t[(t.bin_type != 'all') & t.metric.isin(['sigma_nmad', 'eta', 'crps', 'pco'])]\n"
        "display(binned.pivot_table(index=['bin_type', 'bin_lo', 'bin_hi'], columns=['metric', 'estimator'], values='value'))")))
    c.append(nbf.v4.new_markdown_cell("## Plots"))
    c.append(nbf.v4.new_code_cell(guarded(
        "for name in ['pit_qq', 'zphot_zspec', 'metrics_vs_redshift', 'metrics_vs_magnitude', 'example_pdfs']:\n"
        "    if name in result.files:\n        print(name)\n        display(Image(filename=str(result.files[name])))")))
    n = nbf.v4.new_notebook(cells=c)
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return n

nbf.write(nb("dc2", "Comparing the estimators on DC2",
    "cosmoDC2 test files shipped with pz-rail-base: 10,225 training and 20,449 test galaxies, LSST ugrizy. "
    "Baselines: FlexZBoost and BPZ (template fitting).", False), "examples/compare_dc2.ipynb")
nbf.write(nb("boss", "Comparing the estimators on SDSS BOSS DR10",
    "SDSS BOSS DR10 galaxies (ANNZ2 example data, `../shared/data/sdss_boss_dr10`), ugriz, random 70/30 split. "
    "Baseline: FlexZBoost (BPZ is DC2-only: no SDSS filter curves ship with desc-bpz/RAIL). Skips if the data is absent.", True),
    "examples/compare_boss.ipynb")


def nb_catalogue():
    """compare_catalogue.ipynb: the harness on a catalogue file with its own column names."""
    c = []
    c.append(nbf.v4.new_markdown_cell(
        "# Comparing the estimators on your own catalogue\n\n"
        "A catalogue file (HDF5, parquet, FITS or CSV) with its own column names: the columns are mapped once "
        "(`ColumnSpec`), the redshift grid comes from the training redshifts (0 to the maximum rounded up to 0.1) "
        "unless given, and every estimator -- the deep ones, FlexZBoost, BPZ with the filter curves of the bands, "
        "other RAIL estimators (`knn`, `dnf`, `gpz`, `cmnn`, or any `pkg.module:XInformer`) -- gets the same "
        "columns and grid.\n\n"
        "The demo file is the DC2 test catalogue of pz-rail-base rewritten as a parquet file with DES-like column "
        "names (`mag_g_des`, `magerr_g_des`, `z_spec`, `objid`, LSST's ugrizy renamed): point `CATALOGUE` to your "
        "own file and edit the column spec. The same run from the shell:\n\n"
        "```\ndeepz-compare --train train.parquet --test test.parquet \\\n"
        "    --bands mag_u_des,mag_g_des,... --err-bands magerr_u_des,magerr_g_des,... \\\n"
        "    --redshift-col z_spec --id-col objid --estimators nnc,lstm,flexzboost,bpz,knn,dnf --out out/mine\n```\n\n"
        "(BPZ gets its filter curves from the band names where they say LSST, DECam or HSC -- here `_des`, i.e. "
        "DECam, while the photometry is LSST's: for a real DES catalogue that is right, for this demo give "
        "`bpz_filters=[\"DC2LSST_u\", ...]`.)\n\n"
        "Set `DEEPZ_NOTEBOOK_QUICK=1` for a smoke run (quick configurations, small random subsets; the numbers "
        "are then meaningless); `DEEPZ_NOTEBOOK_ESTIMATORS` picks estimators (comma list)."))
    c.append(nbf.v4.new_code_cell(
        "import os\nfrom pathlib import Path\n\nimport numpy as np\nimport pandas as pd\n"
        "from IPython.display import Image, display\n\n"
        "from rail.deepz import datasets\nfrom rail.evaluation.deepz_compare import compare\n\n"
        "QUICK = os.environ.get('DEEPZ_NOTEBOOK_QUICK', '0') == '1'\n"
        "ESTIMATORS = os.environ.get('DEEPZ_NOTEBOOK_ESTIMATORS', 'nnc,lstm,flexzboost,bpz,knn,dnf')\n"
        "OUTDIR = Path(os.environ.get('DEEPZ_NOTEBOOK_OUT', '../out/notebooks' if Path.cwd().name == 'examples' "
        "else 'out/notebooks')) / ('catalogue' + ('_quick' if QUICK else ''))\n"
        "OUTDIR.mkdir(parents=True, exist_ok=True)\n"
        "N = dict(n_train=600, n_test=600) if QUICK else {}"))
    c.append(nbf.v4.new_markdown_cell("## The catalogue files\n\nHere: written from the DC2 demo data with "
        "foreign column names. Replace `TRAIN`/`TEST` by your files (without `TEST`, `from_files` splits `TRAIN` "
        "at random, `test_fraction=0.3`)."))
    c.append(nbf.v4.new_code_cell(
        "dc2 = datasets.load_dc2()\n"
        "rename = {f'mag_{b}_lsst': f'mag_{b}_des' for b in 'ugrizy'}\n"
        "rename.update({f'mag_err_{b}_lsst': f'magerr_{b}_des' for b in 'ugrizy'})\n"
        "rename.update(redshift='z_spec', id='objid')\n"
        "TRAIN, TEST = OUTDIR / 'train.parquet', OUTDIR / 'test.parquet'\n"
        "pd.DataFrame(dc2.train).rename(columns=rename).to_parquet(TRAIN)\n"
        "pd.DataFrame(dc2.test).rename(columns=rename).to_parquet(TEST)\n"
        "pd.read_parquet(TEST).head()"))
    c.append(nbf.v4.new_markdown_cell("## The column spec (given once for every estimator)\n\n"
        "The same keys can live in a YAML file (`deepz-compare --columns cols.yml`). `mag_limits` default to the "
        "99.5th percentile of each band; `nondetect_val` may be a list of markers; `wavelengths` (LSTM band order) "
        "come from the band names where known."))
    c.append(nbf.v4.new_code_cell(
        "spec = datasets.ColumnSpec(\n"
        "    bands=[f'mag_{b}_des' for b in 'ugrizy'],\n"
        "    err_bands=[f'magerr_{b}_des' for b in 'ugrizy'],\n"
        "    redshift_col='z_spec', id_col='objid', ref_band='mag_i_des', nondetect_val=99.0,\n"
        "    bpz_filters=[f'DC2LSST_{b}' for b in 'ugrizy'],  # the demo's photometry is LSST's\n"
        ")\n"
        "ds = datasets.from_files(TRAIN, TEST, spec, name='my_catalogue')\n"
        "print(f'{len(ds.train[\"z_spec\"])} train / {len(ds.test[\"z_spec\"])} test; z grid [{ds.zmin}, {ds.zmax}]; '\n"
        "      f'reference band {ds.ref_band}; wavelengths {ds.wavelengths}')"))
    c.append(nbf.v4.new_markdown_cell("## Train, estimate and evaluate"))
    c.append(nbf.v4.new_code_cell(
        "result = compare(data=ds, estimators=ESTIMATORS, outdir=OUTDIR, quick=QUICK, **N)"))
    c.append(nbf.v4.new_code_cell("display(result.overall())"))
    c.append(nbf.v4.new_markdown_cell("## Plots"))
    c.append(nbf.v4.new_code_cell(
        "for name in ['pit_qq', 'zphot_zspec', 'metrics_vs_redshift', 'metrics_vs_magnitude', 'example_pdfs']:\n"
        "    if name in result.files:\n        print(name)\n        display(Image(filename=str(result.files[name])))"))
    n = nbf.v4.new_notebook(cells=c)
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return n


nbf.write(nb_catalogue(), "examples/compare_catalogue.ipynb")


def nb_scene():
    """scene_dc2.ipynb: simulate scenes, the sep catalog path, the scene network, their metrics."""
    c = []
    c.append(nbf.v4.new_markdown_cell(
        "# The scene estimator: detect, deblend and estimate a redshift PDF for every object of an image\n\n"
        "After DeepDISC (Merz et al., photo-z from LSST DC2 images). `DeepzSceneSimulator` draws multi-band scenes "
        "with GalSim from the DC2 catalogue of pz-rail-base (bulge + disk galaxies, a per-band PSF, sky noise at the "
        "LSST 10-year depths, close pairs so that a known share of objects overlap, faint background objects) with a "
        "truth table (positions, footprints, redshifts, blendedness). `DeepzSceneInformer` trains a torch-only "
        "detector (centre heat map, box and footprint heads) with a Gaussian-mixture redshift head; "
        "`DeepzSceneEstimator` returns one PDF per detection; `DeepzSceneEvaluator` scores it per blending class. "
        "The catalog path on the same pixels (sep detection and aperture photometry) is shown beside it.\n\n"
        "The scenes are simulations (see `rail.deepz.scenes` for the simplifications); measured comparisons "
        "with NNC, FlexZBoost and BPZ on sep photometry are in `benchmarks/results/scenes.md`. "
        "Set `DEEPZ_NOTEBOOK_QUICK=1` for a smoke run (a few tiny scenes, one epoch; the numbers are then "
        "meaningless)."))
    c.append(nbf.v4.new_code_cell(
        "import os\nfrom pathlib import Path\n\nimport matplotlib.pyplot as plt\nimport numpy as np\nimport pandas as pd\n\n"
        "from rail.deepz.datasets import load_dc2\nfrom rail.deepz.scenes import sep_photometry\n"
        "from rail.estimation.algos.deepz_scene import DeepzSceneEstimator, DeepzSceneInformer\n"
        "from rail.evaluation.deepz_scene_metrics import detection_metrics\n"
        "from rail.evaluation.deepz_scene_stages import DeepzSceneEvaluator, DeepzSceneSimulator\n\n"
        "QUICK = os.environ.get('DEEPZ_NOTEBOOK_QUICK', '0') == '1'\n"
        "OUTDIR = Path(os.environ.get('DEEPZ_NOTEBOOK_OUT', '../out/notebooks' if Path.cwd().name == 'examples' "
        "else 'out/notebooks')) / ('scene' + ('_quick' if QUICK else ''))\n"
        "OUTDIR.mkdir(parents=True, exist_ok=True)\n"
        "SCENE = dict(size=32, n_objects=[3, 5], n_background=[0, 1]) if QUICK else "
        "dict(size=48, n_objects=[4, 8], n_background=[0, 3])\n"
        "N_TRAIN, N_TEST = (12, 6) if QUICK else (400, 100)\n"
        "NET = dict(epochs=1, width=8, hidden=8) if QUICK else dict(epochs=30, width=16, hidden=64)\n"
        "dc2 = load_dc2()"))
    c.append(nbf.v4.new_markdown_cell("## Simulate training and test scenes\n\nDifferent catalogue objects "
        "(DC2 training and test files) and independent seeds. Each stage writes the scene table and the truth table."))
    c.append(nbf.v4.new_code_cell(
        "def simulate(table, n, seed, tag):\n"
        "    stage = DeepzSceneSimulator.make_stage(name=f'simulate_{tag}', n_scenes=n, seed=seed, **SCENE,\n"
        "                                           output=str(OUTDIR / f'scenes_{tag}.hdf5'),\n"
        "                                           truth=str(OUTDIR / f'truth_{tag}.hdf5'))\n"
        "    out = stage.simulate(table)\n"
        "    return out['output'](), out['truth']()\n\n"
        "train_scenes, train_truth = simulate(dc2.train, N_TRAIN, 0, 'train')\n"
        "test_scenes, test_truth = simulate(dc2.test, N_TEST, 1, 'test')\n"
        "print('test scenes', test_scenes['images'].shape, '| objects', len(test_truth['x']),\n"
        "      '| gold', int(test_truth['gold'].sum()),\n"
        "      '| gold with blendedness >= 0.2:', int((test_truth['gold'] & (test_truth['blendedness'] >= 0.2)).sum()))"))
    c.append(nbf.v4.new_markdown_cell("## One scene\n\ng, r, i as blue, green, red (asinh stretch); "
        "truth positions coloured by blendedness (0 isolated, 1 dominated by neighbours)."))
    c.append(nbf.v4.new_code_cell(
        "def rgb(img, noise):\n"
        "    x = np.arcsinh(img[[3, 2, 1]] / (3 * noise[[3, 2, 1], None, None]))\n"
        "    return np.clip(np.moveaxis(x, 0, -1) / np.percentile(x, 99.5), 0, 1)\n\n"
        "s = 0\nm = test_truth['scene_id'] == s\n"
        "fig, ax = plt.subplots(figsize=(5, 5))\n"
        "ax.imshow(rgb(test_scenes['images'][s], test_scenes['noise_sigma'][s]), origin='lower')\n"
        "sc = ax.scatter(test_truth['x'][m], test_truth['y'][m], c=test_truth['blendedness'][m], vmin=0, vmax=1,\n"
        "                cmap='viridis', marker='+', s=80)\n"
        "plt.colorbar(sc, ax=ax, label='truth blendedness'); ax.set_title(f'scene {s}'); plt.show()"))
    c.append(nbf.v4.new_markdown_cell("## The catalog path: sep on the same pixels"))
    c.append(nbf.v4.new_code_cell(
        "sep_cat = sep_photometry(test_scenes, test_truth)\n"
        "sep_det = detection_metrics(test_truth, sep_cat['truth_index'])\n"
        "print({k: round(sep_det[k], 3) for k in ('purity', 'completeness', 'completeness_isolated', "
        "'completeness_blended')})"))
    c.append(nbf.v4.new_markdown_cell("## Train the scene network and detect"))
    c.append(nbf.v4.new_code_cell(
        "inform = DeepzSceneInformer.make_stage(name='inform_scene', model=str(OUTDIR / 'model_scene.pkl'),\n"
        "                                       progress=False, seed=0, **NET)\n"
        "model = inform.inform(train_scenes, train_truth)\n"
        "estimate = DeepzSceneEstimator.make_stage(name='estimate_scene', model=model, chunk_size=64,\n"
        "                                          output=str(OUTDIR / 'pz_scene.hdf5'))\n"
        "pz = estimate.estimate(test_scenes, truth=test_truth)\n"
        "ens = pz()\n"
        "print(ens.npdf, 'detections; ancil:', sorted(ens.ancil))"))
    c.append(nbf.v4.new_markdown_cell("## Metrics per blending class\n\nDetection: completeness of gold "
        "objects (i <= 25.3) and purity; photo-z on the matched gold objects, with 16-84% bootstrap intervals."))
    c.append(nbf.v4.new_code_cell(
        "evaluator = DeepzSceneEvaluator.make_stage(name='evaluate_scene', n_boot=20 if QUICK else 100,\n"
        "                                           output=str(OUTDIR / 'metrics_scene.hdf5'))\n"
        "table = evaluator.evaluate(pz, test_truth)()\n"
        "df = pd.DataFrame({k: [v.decode() if isinstance(v, bytes) else v for v in col] for k, col in table.items()})\n"
        "print(df[df.section == 'detection'].to_string(index=False))\n"
        "df[df.section == 'photoz'].pivot_table(index='metric', columns='blend_class', values='value')"))
    c.append(nbf.v4.new_markdown_cell("## Detections and PDFs"))
    c.append(nbf.v4.new_code_cell(
        "m_det = ens.ancil['scene_id'] == s\n"
        "fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))\n"
        "a.imshow(rgb(test_scenes['images'][s], test_scenes['noise_sigma'][s]), origin='lower')\n"
        "a.scatter(test_truth['x'][m], test_truth['y'][m], marker='+', s=80, c='w', label='truth')\n"
        "a.scatter(ens.ancil['x'][m_det], ens.ancil['y'][m_det], marker='o', s=60, facecolors='none', edgecolors='r',\n"
        "          label='network')\n"
        "a.scatter(sep_cat['x'][sep_cat['scene_id'] == s], sep_cat['y'][sep_cat['scene_id'] == s], marker='x', s=50,\n"
        "          c='c', label='sep')\n"
        "a.legend(loc='upper right', fontsize=8)\n"
        "z = np.linspace(0, 3, 301)\n"
        "ti = ens.ancil['truth_index']\n"
        "for k in np.flatnonzero(m_det & (ti >= 0))[:4]:\n"
        "    line, = b.plot(z, ens[int(k)].pdf(z)[0], label=f\"blendedness {test_truth['blendedness'][ti[k]]:.2f}\")\n"
        "    b.axvline(test_truth['redshift'][ti[k]], color=line.get_color(), ls=':')\n"
        "b.set_xlabel('redshift'); b.set_ylabel('p(z)'); b.legend(fontsize=8); plt.show()"))
    n = nbf.v4.new_notebook(cells=c)
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return n


nbf.write(nb_scene(), "examples/scene_dc2.ipynb")
