"""Write a large HDF5 estimation input by resampling the DC2 test catalogue.

Rows are drawn with replacement (seeded) from the 20,449-row cosmoDC2 validation file
shipped with pz-rail-base and written block by block into h5py datasets created with the
final size, so making a 10-million-row file needs memory for one block only. The output
has RAIL's layout: group ``photometry`` with the DC2 columns (``mag_*_lsst``,
``mag_err_*_lsst``, ``redshift``) and a unique ``id`` (0..N-1; the source row is kept in
``source_row``). With ``--images`` a 4-d column ``images`` (N, 6, S, S) of synthetic
stamps (:func:`rail.deepz.images.synthetic_stamps`, nJy per pixel) is added for the image
CNN; stamps are simulated block by block too (6 x 16 x 16 float32 = 6 KiB per object).

    python benchmarks/make_large_input.py 10000000 /tmp/dc2_1e7.hdf5
    python benchmarks/make_large_input.py 100000 /tmp/dc2_stamps_1e5.hdf5 --images

The file sizes are about 52 bytes/row without images (520 MB for 1e7 rows).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np


def make_large_input(
    n: int,
    path: str | Path,
    seed: int = 0,
    block: int = 1_000_000,
    images: bool = False,
    stamp_size: int = 16,
    group: str = "photometry",
) -> Path:
    """Write ``n`` resampled DC2 rows to ``path`` (HDF5, group ``group``); return the path.

    Parameters
    ----------
    n : int
        Number of rows.
    path : str or Path
        Output HDF5 file (overwritten).
    seed : int
        Seeds the resampling (and the stamps' size scatter and noise).
    block : int
        Rows generated and written at a time (bounds the memory: ~100 bytes/row, plus
        6 * stamp_size**2 * 4 bytes/row and the simulator's FFT work space with images).
    images : bool
        Add an ``images`` column of synthetic stamps (N, 6, stamp_size, stamp_size).
    """
    import h5py

    from rail.deepz.datasets import load_dc2

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ds = load_dc2()
    src = {k: np.asarray(v) for k, v in ds.test.items()}
    cols = [c for c in src if c != "id"]
    m = len(src[ds.redshift_col])
    if images:
        block = min(block, 50_000)  # the stamp simulator holds complex FFT arrays per block
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        g = f.create_group(group)
        # contiguous 1-d datasets (the layout of the DC2 files): fast slicing by RAIL's iterator
        dsets = {c: g.create_dataset(c, shape=(n,), dtype=src[c].dtype) for c in cols}
        ids = g.create_dataset("id", shape=(n,), dtype=np.int64)
        srow = g.create_dataset("source_row", shape=(n,), dtype=np.int64)
        if images:
            from rail.deepz.images import synthetic_stamps

            shape = (n, len(ds.bands), stamp_size, stamp_size)
            imgs = g.create_dataset("images", shape=shape, dtype=np.float32,
                                    chunks=(min(n, 1024), *shape[1:]))
            limits = [ds.mag_limits[b] for b in ds.bands]
        for start in range(0, n, block):
            stop = min(n, start + block)
            idx = rng.integers(0, m, stop - start)
            for c in cols:
                dsets[c][start:stop] = src[c][idx]
            ids[start:stop] = np.arange(start, stop, dtype=np.int64)
            srow[start:stop] = idx
            if images:
                mags = np.stack([src[b][idx] for b in ds.bands], axis=1)
                imgs[start:stop] = synthetic_stamps(mags, src[ds.redshift_col][idx], limits, size=stamp_size,
                                                    seed=seed * 1_000_003 + start)
        f.attrs["description"] = (
            f"{n} rows resampled with replacement (seed {seed}) from the DC2 test file "
            "test_dc2_validation_9816.hdf5 (pz-rail-base)" + ("; synthetic stamps in 'images'" if images else "")
        )
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=lambda s: int(float(s)), help="number of rows (1e7 accepted)")
    p.add_argument("path", help="output HDF5 file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block", type=lambda s: int(float(s)), default=1_000_000, help="rows per write")
    p.add_argument("--images", action="store_true", help="add synthetic stamps (column 'images')")
    p.add_argument("--stamp-size", type=int, default=16)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = make_large_input(args.n, args.path, args.seed, args.block, args.images, args.stamp_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {args.n:,} rows to {out} ({out.stat().st_size / 2**20:,.0f} MB) in "
          f"{time.perf_counter() - t0:.1f} s; peak RSS {peak:,.0f} MB")


if __name__ == "__main__":
    main()
