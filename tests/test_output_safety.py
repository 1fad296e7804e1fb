"""What leaves a stage is safe: no NaN PDF passed off as a number, no output over an input,
no model file that runs code when loaded, and a thread count that follows the machine's load
(issue 15, items 2, 3, 5, 8)."""

import copy
import os
import pickle

import numpy as np
import pytest
import tables_io
import torch
from rail.core.data import ModelHandle, TableHandle

from rail.deepz import training
from rail.deepz.datasets import load_dc2
from rail.deepz.modelfile import UnsafeModelFileError, decode, encode, file_kind, load_model, save_model
from rail.deepz.pdf import (
    MASS_TOL,
    binned_ensemble,
    flag_bad_pdfs,
    interp_ensemble,
    mixture_ensemble,
    pdf_mass,
    pdf_ok,
)
from rail.deepz.stages import (
    FORMAT_VERSION,
    BadPDFError,
    DeepzEstimator,
    ModelFormatError,
    PathClashError,
    check_model_values,
)
from rail.estimation.algos.deepz_cnn import DeepzCNNEstimator
from rail.deepz.pdf import fixed_grid_ensemble
from rail.estimation.algos.deepz_embed import DeepzEmbedEstimator
from rail.estimation.algos.deepz_lstm import DeepzLSTMEstimator
from rail.estimation.algos.deepz_nnc import DeepzNNCEstimator, DeepzNNCInformer

TINY = dict(hidden_layers=[16], nbins=40, epochs=2, batch_size=128, progress=False, hdf5_groupname="",
            temperature_scaling=False, seed=1, num_threads=1)
_counter = iter(range(10**6))


def _name(prefix):
    return f"{prefix}_safety_{next(_counter)}"


@pytest.fixture(scope="module")
def dc2():
    return load_dc2(n_train=600, n_test=200, seed=5)


@pytest.fixture(scope="module")
def nnc(dc2, tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "nnc_model.pkl"
    inf = DeepzNNCInformer.make_stage(name=_name("inf"), model=str(path), **TINY)
    inf.inform(dc2.train)
    return inf.model, path


def _estimate(model, data, cls=DeepzNNCEstimator, **kw):
    kw.setdefault("hdf5_groupname", "")
    kw.setdefault("output_mode", "return")
    kw.setdefault("num_threads", 1)
    est = cls.make_stage(name=_name("est"), model=model, **kw)
    return est.estimate(data).data


# ----------------------------------------------------------------- model files


def test_model_file_is_not_a_pickle_and_round_trips(nnc, dc2):
    model, path = nnc
    assert file_kind(path) == "zip" and model["format_version"] == FORMAT_VERSION == 2
    loaded = load_model(path)
    assert loaded.keys() == model.keys()
    np.testing.assert_array_equal(loaded["edges"], model["edges"])
    assert isinstance(loaded["edges"], np.ndarray) and isinstance(loaded["scalers"]["x"]["mean"], np.ndarray)
    for k, v in model["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v)
    # numpy scalars, string arrays, tuples and nested containers survive; objects are refused
    odd = {"a": np.float32(2.5), "s": np.array(["u", "g"]), "t": (1, [np.arange(3)]), "n": None}
    back = decode(encode(odd))
    assert back["a"] == 2.5 and back["s"].tolist() == ["u", "g"] and back["t"][1][0].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match=r"model\['f'\]"):
        encode({"f": lambda: 0})
    # the file and the in-memory model give the same PDFs
    sub = {k: v[:50] for k, v in dc2.test.items()}
    np.testing.assert_array_equal(_estimate(str(path), sub).objdata["pdfs"], _estimate(model, sub).objdata["pdfs"])


class _Payload:
    """Unpickling this writes a marker file: what a malicious model file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_model_files_do_not_run(nnc, dc2, tmp_path):
    model, _ = nnc
    marker = tmp_path / "pwned"
    sub = {k: v[:20] for k, v in dc2.test.items()}
    evil_pickle = tmp_path / "evil.pkl"
    with open(evil_pickle, "wb") as f:
        pickle.dump({**model, "x": _Payload(str(marker))}, f)
    with pytest.raises(UnsafeModelFileError, match="pickle.*allow_pickle_model"):
        _estimate(str(evil_pickle), sub)
    with pytest.raises(UnsafeModelFileError):
        _estimate(ModelHandle("model", path=str(evil_pickle)), sub)  # a handle is read the same way
    # a torch zip archive whose pickle holds an object: torch's restricted unpickler refuses it
    evil_zip = tmp_path / "evil.pt"
    torch.save({"x": _Payload(str(marker))}, evil_zip)
    assert file_kind(evil_zip) == "zip"
    with pytest.raises(UnsafeModelFileError, match="not loaded"):
        _estimate(str(evil_zip), sub)
    assert not marker.exists()
    # neither is it run when a plain pickle of a good model is refused, while opting in loads it
    legacy = tmp_path / "legacy.pkl"
    with open(legacy, "wb") as f:
        pickle.dump({**model, "format_version": 1}, f)
    with pytest.raises(UnsafeModelFileError):
        _estimate(str(legacy), sub)
    with pytest.warns(RuntimeWarning, match="arbitrary code"):
        old = _estimate(str(legacy), sub, allow_pickle_model=True)
    np.testing.assert_array_equal(old.objdata["pdfs"], _estimate(model, sub).objdata["pdfs"])


def test_model_cannot_make_the_embed_estimator_call_a_function(dc2, tmp_path):
    """A foundation encoder built by a 'module:function' loader named in the model file runs only
    when the estimator's own config names the same loader."""
    import hashlib

    marker = tmp_path / "pwned"
    script = tmp_path / "weights.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    model = {"format": "rail.deepz", "format_version": FORMAT_VERSION, "method": "embed", "bands": dc2.bands,
             "err_bands": dc2.err_bands, "zmin": 0.0, "zmax": 3.0,
             "encoder": {"kind": "foundation", "path": str(script), "format": "loader", "loader": "runpy:run_path",
                         "inputs": ["mags"], "sha256": hashlib.sha256(script.read_bytes()).hexdigest(), "out_dim": 4}}
    with pytest.raises(ModelFormatError, match="foundation_loader='runpy:run_path'"):
        _estimate(model, {k: v[:5] for k, v in dc2.test.items()}, cls=DeepzEmbedEstimator)
    assert not marker.exists()


def test_interactive_model_dict_still_works(nnc, dc2):
    import rail.interactive  # noqa: F401
    from rail.interactive.estimation.algos import deepz_nnc

    model, _ = nnc
    sub = {k: v[:30] for k, v in dc2.test.items()}
    out = deepz_nnc.deepz_nnc_estimator(input_data=sub, model=model, hdf5_groupname="", num_threads=1)["output"]
    assert out.npdf == 30 and np.all(np.isfinite(out.ancil["zmode"]))


# ----------------------------------------------------------------- models with non-finite values


@pytest.mark.parametrize("where", ["state_dict", "scalers", "temperature0", "temperature_neg", "temperature_nan"])
def test_estimator_refuses_non_finite_model(nnc, dc2, where):
    model = copy.deepcopy(nnc[0])
    if where == "state_dict":
        key = next(iter(model["state_dict"]))
        model["state_dict"][key] = model["state_dict"][key].clone()
        model["state_dict"][key].view(-1)[0] = float("nan")
        match = rf"state_dict\['{key}'\] \(1 value"
    elif where == "scalers":
        model["scalers"]["x"]["std"] = model["scalers"]["x"]["std"].copy()
        model["scalers"]["x"]["std"][1] = np.inf
        match = r"scalers\['x'\]\['std'\]"
    else:
        model["temperature"] = {"temperature0": 0.0, "temperature_neg": -1.0, "temperature_nan": float("nan")}[where]
        match = "'temperature'"
    with pytest.raises(ModelFormatError, match=match):
        _estimate(model, {k: v[:5] for k, v in dc2.test.items()})


def test_width_factors_checked():
    base = {"state_dict": {"w": torch.ones(2)}, "scalers": {}}
    check_model_values({**base, "sigma_scale": 1.2, "arch": {"sigma": 0.01}})
    with pytest.raises(ModelFormatError, match="'sigma_scale'"):
        check_model_values({**base, "sigma_scale": 0.0})
    with pytest.raises(ModelFormatError, match="'arch.sigma'"):
        check_model_values({**base, "arch": {"sigma": -0.1}})
    with pytest.raises(ModelFormatError, match=r"member_weights\[1\]"):
        check_model_values({**base, "member_weights": [0.5, float("nan")]})


# ----------------------------------------------------------------- PDFs that are not PDFs


def test_every_ensemble_type_is_checked_row_by_row():
    rng = np.random.default_rng(0)
    n, k = 12, 5
    w = rng.dirichlet(np.ones(k), n).astype(np.float32)
    mu, s = rng.uniform(0.2, 2.5, (n, k)), rng.uniform(0.05, 0.3, (n, k))
    w[3, 0] = np.nan  # NaN weight
    w[5] *= 0.5       # unnormalised
    s[7, 2] = 0.0     # zero width
    bad = [3, 5, 7]
    for rep in ("mixmod", "interp"):
        with np.errstate(all="ignore"):
            ens = mixture_ensemble(w, mu, s, 0.0, 3.0, 101, rep)
        if rep == "mixmod":
            # qp renormalises the stored weights; the reported p_outside (from the network's
            # weights) then disagrees with the stored mixture's mass inside [0, 3]
            mass = pdf_mass(ens, (0.0, 3.0))
            assert abs(mass[0] - 1) < 1e-6 and mass[5] > 1 + 10 * MASS_TOL
        ok = pdf_ok(ens, zrange=(0.0, 3.0))
        # interp renormalises on the grid, so only the NaN row is bad there
        assert np.flatnonzero(~ok).tolist() == (bad if rep == "mixmod" else [3, 7])
    # fixed-grid mixtures (embedding MDN)
    c = np.linspace(0, 3, 30)
    wf = rng.dirichlet(np.ones(30), n).astype(np.float32)
    wf[2] = np.nan
    wf[4] *= 0.9
    with np.errstate(all="ignore"):
        ens = fixed_grid_ensemble(wf, c, 0.05, 0.0, 3.0)
    assert np.flatnonzero(~pdf_ok(ens, zrange=(0.0, 3.0))).tolist() == [2, 4]
    # histograms (NNC): a NaN row, an all-zero row
    p = rng.dirichlet(np.ones(20), n).astype(np.float32)
    p[1] = np.nan
    p[6] = 0.0
    ens = binned_ensemble(p, np.linspace(0, 3, 21))
    assert np.flatnonzero(~pdf_ok(ens)).tolist() == [1, 6]
    assert np.isfinite(ens.ancil["zmode"][1])  # the number the check exists for
    assert pdf_ok(binned_ensemble(p[:0], np.linspace(0, 3, 21))).shape == (0,)  # empty input: valid
    flag_bad_pdfs(ens, pdf_ok(ens))
    assert ens.ancil["pdf_ok"].tolist() == [i not in (1, 6) for i in range(n)]
    for key in ("zmode", "zmean", "zmedian", "zstd", "z_q16", "p_outside"):
        assert np.isnan(ens.ancil[key][[1, 6]]).all() and np.isfinite(ens.ancil[key][[0, 2]]).all()
    # a grid PDF inside tolerance passes, one just outside fails
    z = np.linspace(0, 1, 11)
    y = np.ones((2, 11))
    y[1] *= 1 + 3 * MASS_TOL
    assert pdf_ok(interp_ensemble(z, y)).all()  # interp_ensemble renormalises
    import qp

    assert pdf_ok(qp.Ensemble(qp.interp, data=dict(xvals=z, yvals=y, norm=False))).tolist() == [True, False]


def test_every_estimator_checks_its_pdfs_in_the_base_class():
    for cls in (DeepzNNCEstimator, DeepzLSTMEstimator, DeepzEmbedEstimator, DeepzCNNEstimator):
        assert cls._process_chunk is DeepzEstimator._process_chunk, cls.__name__


def _overflowing(model):
    """A model whose weights are finite but overflow float32 for some objects: +inf logits."""
    m = copy.deepcopy(model)
    w = m["state_dict"]["head.linear.weight"].clone()
    w[0] = 3e37
    m["state_dict"]["head.linear.weight"] = w
    return m


def test_nan_pdfs_raise_naming_rows_or_are_flagged(nnc, dc2, tmp_path):
    data = {k: v[:200] for k, v in dc2.test.items()}
    flagged = _estimate(_overflowing(nnc[0]), data, bad_pdf_policy="flag", chunk_size=70)
    bad = np.flatnonzero(~flagged.ancil["pdf_ok"])
    assert 0 < len(bad) < 200  # the weight gives +inf logits for some rows only
    assert np.isnan(flagged.ancil["zmode"][bad]).all()
    assert np.isfinite(flagged.ancil["zmode"][flagged.ancil["pdf_ok"]]).all()
    first = ", ".join(str(i) for i in bad[bad < 70][:5])
    with pytest.raises(BadPDFError, match=rf"\d+ PDF\(s\) .* input rows {first}"):
        _estimate(_overflowing(nnc[0]), data, chunk_size=70)
    # a later chunk names rows by their index in the whole input, not in the chunk
    good = np.flatnonzero(flagged.ancil["pdf_ok"])[:30]
    order = np.concatenate([good, bad[:2]])
    with pytest.raises(BadPDFError, match=f"2 PDF\\(s\\) .* input rows {len(good)}, {len(good) + 1}\\."):
        _estimate(_overflowing(nnc[0]), {k: v[order] for k, v in data.items()}, chunk_size=len(good))
    # a good model: the flag column is all True and nothing else changes
    good = _estimate(nnc[0], data, bad_pdf_policy="flag")
    plain = _estimate(nnc[0], data)
    assert good.ancil["pdf_ok"].all() and "pdf_ok" not in plain.ancil
    np.testing.assert_array_equal(good.ancil["zmode"], plain.ancil["zmode"])
    with pytest.raises(ValueError, match="bad_pdf_policy"):
        DeepzNNCEstimator.make_stage(name=_name("est"), model=nnc[0], bad_pdf_policy="ignore")


# ----------------------------------------------------------------- outputs over inputs


def test_informer_refuses_model_over_training_file(dc2, tmp_path):
    train = tmp_path / "train.hdf5"
    tables_io.write({k: v[:300] for k, v in dc2.train.items()}, str(train))
    before = train.read_bytes()
    inf = DeepzNNCInformer.make_stage(name=_name("inf"), model=str(train), **TINY)
    with pytest.raises(PathClashError, match=r"output 'model' .*train\.hdf5.* input 'input'"):
        inf.inform(TableHandle("input", path=str(train)))
    # also through another spelling of the same path
    inf = DeepzNNCInformer.make_stage(name=_name("inf"), model=str(tmp_path / "." / "train.hdf5"), **TINY)
    with pytest.raises(PathClashError):
        inf.inform(TableHandle("input", path=str(train)))
    assert train.read_bytes() == before


def test_estimator_refuses_output_over_input_or_model(nnc, dc2, tmp_path):
    model, path = nnc
    test = tmp_path / "test.hdf5"
    tables_io.write({k: v[:50] for k, v in dc2.test.items()}, str(test))
    before, model_bytes = test.read_bytes(), path.read_bytes()
    est = DeepzNNCEstimator.make_stage(name=_name("est"), model=str(path), output=str(test), hdf5_groupname="",
                                       num_threads=1)
    with pytest.raises(PathClashError, match=r"output 'output' .*test\.hdf5.* input 'input'"):
        est.estimate(TableHandle("input", path=str(test)))
    os.symlink(path, tmp_path / "link.pkl")  # a link to the model file is the model file
    est = DeepzNNCEstimator.make_stage(name=_name("est"), model=str(path), output=str(tmp_path / "link.pkl"),
                                       hdf5_groupname="", num_threads=1)
    with pytest.raises(PathClashError, match=r"input 'model'"):
        est.estimate(TableHandle("input", path=str(test)))
    assert test.read_bytes() == before and path.read_bytes() == model_bytes
    # a distinct output is fine
    est = DeepzNNCEstimator.make_stage(name=_name("est"), model=str(path), output=str(tmp_path / "pz.hdf5"),
                                       hdf5_groupname="", num_threads=1)
    est.estimate(TableHandle("input", path=str(test)))
    assert (tmp_path / "pz.hdf5").is_file()


# ----------------------------------------------------------------- threads


def test_num_threads_set_for_the_run_and_restored(monkeypatch, nnc, dc2):
    before = torch.get_num_threads()
    seen = []
    real = DeepzNNCEstimator._estimate_chunk

    def spy(self, data):
        seen.append(torch.get_num_threads())
        return real(self, data)

    monkeypatch.setattr(DeepzNNCEstimator, "_estimate_chunk", spy)
    _estimate(nnc[0], {k: v[:20] for k, v in dc2.test.items()}, num_threads=2)
    assert seen == [2] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        DeepzNNCEstimator.make_stage(name=_name("est"), model=nnc[0], num_threads=-1)


def test_automatic_threads_follow_load(monkeypatch):
    monkeypatch.setenv("DEEPZ_NUM_THREADS", "3")  # a fixed count for the session wins over automatic
    assert training.choose_num_threads(0)[0] == 3
    monkeypatch.setenv("DEEPZ_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="DEEPZ_NUM_THREADS"):
        training.choose_num_threads(0)
    monkeypatch.delenv("DEEPZ_NUM_THREADS")
    monkeypatch.setattr(training, "allowed_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    for busy, want in ((0.0, 4), (0.4, 4), (1.2, 3), (2.6, 1), (3.0, 1), (7.0, 1), (None, 4)):
        monkeypatch.setattr(training, "busy_cpus_elsewhere", lambda cpus, b=busy: b)
        assert training.choose_num_threads(0)[0] == want, busy
    # never more than torch's own count (OMP_NUM_THREADS) or the usable CPUs; explicit wins
    monkeypatch.setattr(training, "busy_cpus_elsewhere", lambda cpus: 0.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert training.choose_num_threads(0)[0] == 1
    assert training.choose_num_threads(3)[0] == 3


def test_busy_probe_is_bounded():
    cpus = training.allowed_cpus()
    assert len(cpus) >= 1 and set(cpus) <= set(range(os.cpu_count()))
    busy = training.busy_cpus_elsewhere(cpus, probe_s=0.05)
    assert busy is None or 0.0 <= busy <= len(cpus) + 0.5
