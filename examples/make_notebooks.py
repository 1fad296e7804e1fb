"""Regenerate examples/compare_dc2.ipynb, compare_boss.ipynb and compare_catalogue.ipynb (run from the repository root).

The notebooks drive rail.evaluation.deepz_compare.compare(); DEEPZ_NOTEBOOK_QUICK=1 makes them a smoke run
(tests/test_evaluation.py executes them that way with nbclient).
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
