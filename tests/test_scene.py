"""Scene simulator, sep baseline, scene estimator (issue 17) on tiny scenes."""

import numpy as np
import pytest

galsim = pytest.importorskip("galsim", reason="the 'scenes' extra (galsim) is not installed")
sep = pytest.importorskip("sep", reason="the 'scenes' extra (sep) is not installed")

from rail.deepz.datasets import load_dc2  # noqa: E402
from rail.deepz.scenes import (  # noqa: E402
    GOLD_I_MAG,
    SceneConfig,
    SceneInputError,
    match_positions,
    sep_photometry,
    simulate_scenes,
)
from rail.estimation.algos.deepz_scene import DeepzSceneEstimator, DeepzSceneInformer  # noqa: E402
from rail.evaluation.deepz_scene_metrics import detection_metrics, per_object_quantities, photoz_by_blending  # noqa: E402

TINY = SceneConfig(size=32, n_objects=(3, 6), n_background=(0, 1), seed=3)
NET = dict(epochs=2, width=8, hidden=16, batch_size=8, progress=False, device="cpu")
_count = [0]


def _name(prefix):
    _count[0] += 1
    return f"{prefix}_scene_{_count[0]}"


@pytest.fixture(scope="module")
def catalog():
    return load_dc2().train


@pytest.fixture(scope="module")
def tiny(catalog):
    return simulate_scenes(catalog, 16, TINY)


@pytest.fixture(scope="module")
def model(tiny):
    scenes, truth = tiny
    inf = DeepzSceneInformer.make_stage(name=_name("inf"), **NET)
    return inf.inform(scenes, truth)


def test_simulator_is_seeded_and_truth_consistent(catalog, tiny):
    scenes, truth = tiny
    again = simulate_scenes(catalog, 16, TINY)
    np.testing.assert_array_equal(scenes["images"], again[0]["images"])
    np.testing.assert_array_equal(truth["blendedness"], again[1]["blendedness"])
    other = simulate_scenes(catalog, 16, TINY, seed=4)
    assert not np.array_equal(scenes["images"], other[0]["images"])
    assert scenes["images"].shape == (16, 6, 32, 32) and scenes["images"].dtype == np.float32
    assert scenes["psf_fwhm"].shape == (16, 6) and np.all(np.diff(scenes["psf_fwhm"][0]) < 0)  # u widest
    b = truth["blendedness"]
    assert np.all((b >= 0) & (b <= 1)) and b.max() > 0.2  # tiny scenes are crowded: some blends
    assert np.array_equal(truth["footprint_area"], truth["footprint"].sum(axis=(1, 2)))
    x0, y0, x1, y1 = truth["box"].T
    assert np.all((x0 < x1) & (y0 < y1))
    ix, iy = np.rint(truth["x"]).astype(int), np.rint(truth["y"]).astype(int)
    inside = (ix >= x0) & (ix < x1) & (iy >= y0) & (iy < y1)
    assert inside[truth["footprint_area"] > 4].all()
    assert np.array_equal(truth["gold"], (truth["mag_i_lsst"] <= GOLD_I_MAG) & ~truth["background"])
    bkg = truth["background"]
    assert np.all((truth["mag_i_lsst"][bkg] >= 25.5) & (truth["mag_i_lsst"][bkg] <= 27.5))
    assert np.all(np.bincount(truth["scene_id"][~bkg], minlength=16) >= 3)


def test_isolated_object_has_zero_blendedness_and_its_flux(catalog):
    cfg = SceneConfig(size=64, n_objects=(1, 1), n_background=(0, 0), seed=1, margin=28.0,
                      depths={b: 40.0 for b in "ugrizy"})  # negligible noise, centred objects
    scenes, truth = simulate_scenes(catalog, 6, cfg)
    np.testing.assert_allclose(truth["blendedness"], 0.0, atol=1e-6)
    flux = 10 ** (-0.4 * (truth["mag_i_lsst"] - 31.4))
    total = scenes["images"][:, 3].sum(axis=(1, 2))
    small = truth["half_light_radius"] < 0.7  # stamps are cut at 4 r_e + 2 FWHM
    np.testing.assert_allclose(total[small], flux[small], rtol=0.1)


def test_size_laws(catalog):
    cfg = SceneConfig(size=32, n_objects=(6, 6), n_background=(0, 0), seed=2)
    _, mag_law = simulate_scenes(catalog, 30, cfg)
    _, shuffled = simulate_scenes(catalog, 30, cfg, size_law="shuffled")
    np.testing.assert_allclose(np.sort(mag_law["half_light_radius"]), np.sort(shuffled["half_light_radius"]))
    r_mag = np.corrcoef(mag_law["mag_i_lsst"], np.log(mag_law["half_light_radius"]))[0, 1]
    r_shuf = np.corrcoef(shuffled["mag_i_lsst"], np.log(shuffled["half_light_radius"]))[0, 1]
    assert r_mag < -0.5 and abs(r_shuf) < 0.3
    with pytest.raises(ValueError, match="size_law"):
        simulate_scenes(catalog, 2, cfg, size_law="redshift")


def test_match_positions_is_mutual_and_per_scene():
    d2t, t2d = match_positions([0, 0, 1], [1.0, 1.5, 1.0], [1.0, 1.0, 1.0], [0, 1], [1.2, 20.0], [1.0, 1.0], 2.0)
    # det 1 is within the radius of truth 0 but det 0 is nearer; det 2 lies in another scene
    assert d2t.tolist() == [0, -1, -1] and t2d.tolist() == [0, -1]


def test_sep_finds_bright_isolated_objects(catalog):
    bright = {k: v[catalog["mag_i_lsst"] < 23.0] for k, v in catalog.items()}
    cfg = SceneConfig(size=48, n_objects=(1, 1), n_background=(0, 0), seed=5)
    scenes, truth = simulate_scenes(bright, 8, cfg)
    cat = sep_photometry(scenes, truth)
    det = detection_metrics(truth, cat["truth_index"])
    assert det["completeness"] == 1.0 and det["purity"] >= 0.85
    m = cat["truth_index"] >= 0
    assert np.all(np.isfinite(cat["redshift"][m]))
    dm = cat["mag_i_lsst"][m] - truth["mag_i_lsst"][cat["truth_index"][m]]
    assert np.all(dm > -0.1)  # a 1" aperture holds at most the total flux (plus noise)
    ti = cat["truth_index"][m]
    dcol = (cat["mag_r_lsst"][m] - cat["mag_i_lsst"][m]) - (truth["mag_r_lsst"][ti] - truth["mag_i_lsst"][ti])
    assert np.median(np.abs(dcol)) < 0.1  # same profile in every band: aperture colours ~ true colours


def test_network_trains_and_emits_documented_ensemble(tiny, model):
    scenes, truth = tiny
    hist = model()["train"]["history"]
    assert len(hist) == 2 and all(np.isfinite(h["val_loss"]) for h in hist)
    est = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, score_threshold=0.05, device="cpu")
    ens = est.estimate(scenes, truth=truth)()
    n = ens.npdf
    assert n > 0
    for key in ("scene_id", "x", "y", "score", "box", "footprint_area", "zmode", "zmean", "zmedian", "truth_index"):
        assert key in ens.ancil and len(ens.ancil[key]) == n
    assert ens.ancil["box"].shape == (n, 4)
    w = ens.objdata["weights"]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(ens.objdata["stds"] > 0) and np.all(np.isfinite(ens.ancil["zmode"]))
    assert np.all(ens.ancil["score"] > 0.05) and set(ens.ancil["scene_id"]) <= set(scenes["scene_id"])
    ti = ens.ancil["truth_index"]
    assert np.all((ti >= -1) & (ti < len(truth["x"])))
    assert len(set(ti[ti >= 0])) == int((ti >= 0).sum())  # one-to-one
    # streaming: chunks of 5 scenes give the same detections as one chunk
    est5 = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, score_threshold=0.05, device="cpu",
                                          chunk_size=5)
    ens5 = est5.estimate(scenes)()
    assert ens5.npdf == n
    np.testing.assert_allclose(ens5.ancil["x"], ens.ancil["x"], atol=1e-4)
    np.testing.assert_allclose(ens5.objdata["means"], ens.objdata["means"], atol=1e-4)


def test_positions_mode_is_row_aligned(tiny, model):
    scenes, truth = tiny
    order = np.random.default_rng(0).permutation(len(truth["x"]))
    pos = {k: np.asarray(truth[k])[order] for k in ("scene_id", "x", "y")}
    est = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, mode="positions", device="cpu", chunk_size=4)
    ens = est.estimate(scenes, positions=pos)()
    assert ens.npdf == order.size
    np.testing.assert_array_equal(ens.ancil["scene_id"], pos["scene_id"])
    ref = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, mode="positions", device="cpu")
    ens_ref = ref.estimate(scenes, positions={k: np.asarray(truth[k]) for k in ("scene_id", "x", "y")})()
    np.testing.assert_allclose(ens.objdata["means"], ens_ref.objdata["means"][order], atol=1e-5)
    # a position in a scene that does not exist
    bad = dict(pos, scene_id=pos["scene_id"] + 1000)
    with pytest.raises(SceneInputError, match="not in the scene table"):
        DeepzSceneEstimator.make_stage(name=_name("est"), model=model, mode="positions").estimate(scenes, positions=bad)
    with pytest.raises(SceneInputError, match="positions"):
        DeepzSceneEstimator.make_stage(name=_name("est"), model=model, mode="positions").estimate(scenes)


def test_bad_inputs_get_clear_errors(tiny, model):
    scenes, truth = tiny
    est = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, device="cpu")
    five = dict(scenes, images=scenes["images"][:, :5])
    with pytest.raises(SceneInputError, match="5 channel"):
        est.estimate(five)
    nan = dict(scenes, images=scenes["images"].copy())
    nan["images"][2, 1, 3, 3] = np.nan
    with pytest.raises(SceneInputError, match="NaN"):
        DeepzSceneEstimator.make_stage(name=_name("est"), model=model).estimate(nan)
    mixed = dict(scenes, images=[scenes["images"][0], scenes["images"][1, :, :16, :16]], scene_id=np.arange(2))
    mixed = {k: (v if k == "images" else np.asarray(v)[:2]) for k, v in mixed.items()}
    with pytest.raises(SceneInputError, match="mixed sizes"):
        DeepzSceneEstimator.make_stage(name=_name("est"), model=model).estimate(mixed)
    no_ids = {k: v for k, v in truth.items() if k != "scene_id"}
    with pytest.raises(SceneInputError, match="scene_id"):
        DeepzSceneEstimator.make_stage(name=_name("est"), model=model).estimate(scenes, truth=no_ids)
    with pytest.raises(SceneInputError, match="scene_id"):
        DeepzSceneInformer.make_stage(name=_name("inf"), **NET).inform(scenes, no_ids)
    with pytest.raises(SceneInputError, match="channel"):
        DeepzSceneInformer.make_stage(name=_name("inf"), **dict(NET, bands=list("griz"))).inform(scenes, truth)
    with pytest.raises(SceneInputError, match="NaN"):
        DeepzSceneInformer.make_stage(name=_name("inf"), **NET).inform(nan, truth)
    with pytest.raises(SceneInputError, match="mixed sizes"):
        DeepzSceneInformer.make_stage(name=_name("inf"), **NET).inform(mixed, truth)
    with pytest.raises(ValueError, match="did you mean 'score_threshold'"):
        DeepzSceneEstimator.make_stage(name=_name("est"), model=model, score_treshold=0.2)
    with pytest.raises(ValueError, match="mode"):
        DeepzSceneEstimator.make_stage(name=_name("est"), model=model, mode="segment")


def test_scene_metrics(tiny, model):
    scenes, truth = tiny
    n = len(truth["x"])
    perfect = detection_metrics(truth, np.arange(n), select=np.ones(n, bool))
    assert perfect["completeness"] == 1.0 and perfect["purity"] == 1.0
    half = detection_metrics(truth, np.r_[np.arange(0, n, 2), [-1]], select=np.ones(n, bool))
    assert half["completeness"] == pytest.approx(np.ceil(n / 2) / n) and half["purity"] < 1.0
    assert sum(r["n"] for r in half["vs_blendedness"]) == n
    est = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, mode="positions", device="cpu")
    ens = est.estimate(scenes, positions={k: truth[k] for k in ("scene_id", "x", "y")})()
    po = per_object_quantities(ens, truth["redshift"], 0.0, 3.0)
    res = photoz_by_blending(po, truth["blendedness"], n_boot=5)
    assert res["all"]["n"] == n == sum(res[c]["n"] for c in ("isolated", "mild", "blended"))
    s = res["all"]["sigma_nmad"]
    assert np.isfinite(s["value"]) and s["lo"] <= s["hi"]


def test_rail_interactive_runs_scene_stages(tmp_path):
    """`rail.interactive` finds both stages (fresh process); inputs are passed by tag name."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import rail.interactive
        from rail.interactive.estimation.algos import deepz_scene as ds
        from rail.deepz.datasets import load_dc2
        from rail.deepz.scenes import SceneConfig, simulate_scenes
        sc, tr = simulate_scenes(load_dc2().train, 6, SceneConfig(size=32, n_objects=(3, 4), seed=1))
        m = ds.deepz_scene_informer(input=sc, truth=tr, epochs=1, width=8, hidden=8, progress=False)
        out = ds.deepz_scene_estimator(model=m["model"], input=sc, truth="none", positions=tr, mode="positions")
        assert out["output"].npdf == len(tr["x"]), out["output"].npdf
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


def test_model_file_round_trip(tiny, tmp_path):
    scenes, truth = tiny
    path = tmp_path / "scene_model.pkl"
    inf = DeepzSceneInformer.make_stage(name=_name("inf"), model=str(path), **dict(NET, epochs=1))
    handle = inf.inform(scenes, truth)
    assert path.exists()
    pos = {k: truth[k] for k in ("scene_id", "x", "y")}
    a = DeepzSceneEstimator.make_stage(name=_name("est"), model=handle, mode="positions").estimate(scenes, positions=pos)()
    b = DeepzSceneEstimator.make_stage(name=_name("est"), model=str(path), mode="positions").estimate(scenes, positions=pos)()
    np.testing.assert_allclose(a.objdata["means"], b.objdata["means"], rtol=1e-6)
    with pytest.raises(Exception, match="scene"):  # a model of another method is refused
        bad = dict(handle(), method="cnn")
        DeepzSceneEstimator.make_stage(name=_name("est"), model=bad).estimate(scenes)


def test_augmentation_moves_targets_with_pixels():
    import torch

    from rail.estimation.algos.deepz_scene import augment_scenes

    n = 9
    x = torch.zeros(1, 1, n, n)
    x[0, 0, 2, 6] = 1.0  # object at x=6, y=2
    t = {"x": torch.tensor([[6.0]]), "y": torch.tensor([[2.0]]), "logwh": torch.tensor([[[1.0, 2.0]]]),
         "mask": x.clone()}
    for k in range(4):
        for flip in (False, True):
            xa, ta = augment_scenes(x, t, k, flip)
            yy, xx = torch.nonzero(xa[0, 0])[0].tolist()
            assert (xx, yy) == (int(ta["x"]), int(ta["y"])) and torch.equal(xa, ta["mask"])
            assert ta["logwh"][0, 0].tolist() == ([2.0, 1.0] if k % 2 else [1.0, 2.0])


def test_scenes_stream_from_an_hdf5_file(tiny, model, tmp_path):
    import tables_io
    from rail.core.data import TableHandle

    scenes, _ = tiny
    path = tmp_path / "scenes.hdf5"
    tables_io.write(scenes, str(path))
    ref = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, score_threshold=0.05).estimate(scenes)()
    est = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, score_threshold=0.05, chunk_size=3,
                                         output=str(tmp_path / "out.hdf5"))
    handle = est.estimate(TableHandle("input", path=str(path)))
    ens = handle.read() if handle.data is None else handle()
    assert ens.npdf == ref.npdf
    np.testing.assert_array_equal(ens.ancil["scene_id"], ref.ancil["scene_id"])
    np.testing.assert_allclose(ens.ancil["x"], ref.ancil["x"], atol=1e-4)  # batches differ: float rounding


def test_simulator_stage_matches_the_function_and_checks_options(catalog, tmp_path):
    from rail.evaluation.deepz_scene_stages import DeepzSceneSimulator

    opts = dict(n_scenes=4, size=32, n_objects=[3, 4], n_background=[0, 1], seed=7)
    stage = DeepzSceneSimulator.make_stage(name=_name("sim"), output=str(tmp_path / "sc.hdf5"),
                                           truth=str(tmp_path / "tr.hdf5"), **opts)
    out = stage.simulate(catalog)
    ref_sc, ref_tr = simulate_scenes(catalog, 4, SceneConfig(size=32, n_objects=(3, 4), n_background=(0, 1), seed=7))
    np.testing.assert_array_equal(out["output"]()["images"], ref_sc["images"])
    np.testing.assert_array_equal(out["truth"]()["footprint"], ref_tr["footprint"])
    assert (tmp_path / "sc.hdf5").is_file() and (tmp_path / "tr.hdf5").is_file()
    for bad, match in ((dict(size_law="redshift"), "size_law"), (dict(n_objects=[5, 3]), "n_objects"),
                       (dict(n_scene=5), "n_scenes"), (dict(pair_fraction=1.5), "pair_fraction"),
                       (dict(n_scenes="10"), "n_scenes"), (dict(size=10, margin=6.0), "size"),
                       (dict(bands="ugrizw"), "lack band")):
        with pytest.raises(ValueError, match=match):
            DeepzSceneSimulator.make_stage(name=_name("sim"), **bad)
    no_z = {k: v for k, v in catalog.items() if k != "redshift"}
    with pytest.raises(SceneInputError, match="redshift"):
        DeepzSceneSimulator.make_stage(name=_name("sim"), **opts).simulate(no_z)


def test_scene_evaluator_counts_what_it_matches(tiny):
    """Perfect detections (the truth positions, one PDF each) -> completeness 1 and purity 1."""
    import qp

    from rail.evaluation.deepz_scene_stages import DeepzSceneEvaluator

    _, truth = tiny
    n = len(truth["x"])
    ens = qp.Ensemble(qp.stats.norm, data=dict(loc=np.asarray(truth["redshift"])[:, None], scale=np.full((n, 1), 0.05)))
    ens.set_ancil({"scene_id": truth["scene_id"], "x": truth["x"], "y": truth["y"],
                   "zmode": np.asarray(truth["redshift"], dtype=np.float64)})
    t = DeepzSceneEvaluator.make_stage(name=_name("ev"), n_boot=5).evaluate(ens, truth)()
    rows = {(s.decode(), c.decode(), m.decode()): (v, k) for s, c, m, v, k in
            zip(t["section"], t["blend_class"], t["metric"], t["value"], t["n"])}
    assert rows[("detection", "all", "purity")] == (1.0, n)
    assert rows[("detection", "all", "completeness")] == (1.0, int(truth["gold"].sum()))
    assert rows[("photoz", "all", "eta")][0] == 0.0
    with pytest.raises(SceneInputError, match="scene_id"):
        no_ids = {k: v for k, v in truth.items() if k != "scene_id"}
        DeepzSceneEvaluator.make_stage(name=_name("ev")).evaluate(ens, no_ids)
    with pytest.raises(SceneInputError, match="scene_id"):
        bare = qp.Ensemble(qp.stats.norm, data=dict(loc=np.zeros((2, 1)), scale=np.ones((2, 1))))
        DeepzSceneEvaluator.make_stage(name=_name("ev")).evaluate(bare, truth)


def test_forced_photometry_is_aligned_with_positions(catalog):
    from rail.deepz.scenes import forced_photometry

    bright = {k: v[catalog["mag_i_lsst"] < 23.0] for k, v in catalog.items()}
    cfg = SceneConfig(size=48, n_objects=(1, 2), n_background=(0, 0), seed=5, pair_fraction=0.0)
    scenes, truth = simulate_scenes(bright, 6, cfg)
    order = np.random.default_rng(1).permutation(len(truth["x"]))
    pos = {k: np.asarray(truth[k])[order] for k in ("scene_id", "x", "y")}
    cat = forced_photometry(scenes, pos)
    np.testing.assert_array_equal(cat["scene_id"], pos["scene_id"])
    ref = forced_photometry(scenes, {k: np.asarray(truth[k]) for k in ("scene_id", "x", "y")})
    np.testing.assert_allclose(cat["flux_i"], ref["flux_i"][order])
    dcol = (cat["mag_r_lsst"] - cat["mag_i_lsst"]) - (truth["mag_r_lsst"] - truth["mag_i_lsst"])[order]
    assert np.median(np.abs(dcol)) < 0.1
    with pytest.raises(SceneInputError, match="not in the scene table"):
        forced_photometry(scenes, dict(pos, scene_id=pos["scene_id"] + 100))


def test_estimator_reads_a_scene_file_chunk_by_chunk(tiny, model, tmp_path):
    """Memory bound: a scene file is read ``chunk_size`` scenes at a time, never whole."""
    import tables_io
    from rail.core.data import TableHandle

    scenes, _ = tiny
    path = tmp_path / "scenes.hdf5"
    tables_io.write(scenes, str(path))
    est = DeepzSceneEstimator.make_stage(name=_name("est"), model=model, chunk_size=5,
                                         output=str(tmp_path / "out.hdf5"))
    est.set_data("input", TableHandle("input", path=str(path)), do_read=False)
    est.open_model(**est.config)
    sizes = [len(chunk["images"]) for _, _, chunk in est._scene_chunks()]
    assert sizes == [5, 5, 5, 1]


def test_aperture_features_of_the_redshift_head(tiny):
    """aperture_radius > 0: aperture S/N and colours join the z head's features; 0 keeps the old network."""
    import torch

    from rail.deepz.nets.scene import SceneNet

    net = SceneNet(3, width=8, hidden=8, aperture_radius=2.0)
    img = torch.asinh(torch.ones(1, 3, 12, 12) * torch.tensor([1.0, 2.0, 4.0])[None, :, None, None])
    ap = net.aperture_features(img)
    npix = 13.0  # pixels within 2 of the centre
    inner = ap[0, :, 6, 6]
    np.testing.assert_allclose(inner[:3].numpy(), np.arcsinh(np.array([1.0, 2.0, 4.0]) * np.sqrt(npix)), rtol=1e-5)
    np.testing.assert_allclose(inner[3:].numpy(), inner[:2].numpy() - inner[1:3].numpy(), rtol=1e-6)
    assert "disk" not in net.state_dict()  # rebuilt from the architecture, not stored
    scenes, truth = tiny
    m = DeepzSceneInformer.make_stage(name=_name("inf"), aperture_radius=3.0, **dict(NET, epochs=1)).inform(scenes, truth)
    assert m()["arch"]["aperture_radius"] == 3.0
    pos = {k: truth[k] for k in ("scene_id", "x", "y")}
    ens = DeepzSceneEstimator.make_stage(name=_name("est"), model=m, mode="positions").estimate(scenes, positions=pos)()
    assert ens.npdf == len(truth["x"]) and np.all(np.isfinite(ens.objdata["means"]))
    with pytest.raises(ValueError, match="aperture_radius"):
        DeepzSceneInformer.make_stage(name=_name("inf"), aperture_radius=-1.0)
