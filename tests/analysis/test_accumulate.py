"""TileSum (analysis/maps/accumulate.py): an L x L sum fed by row tiles, in memory or spilled to a
temporary HDF5 file; both give the same sums (float32 on disk: to float32 rounding), whole rows or
upper parts, mirrored or not, tiles that do and don't divide L; the spill file is removed on close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_performer.analysis.maps import accumulate
from protein_performer.analysis.maps.accumulate import TileSum
from protein_performer.analysis.maps.tiles import tile_ranges

L = 37


def _symmetric(seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).normal(size=(L, L))
    return m + m.T


@pytest.mark.parametrize("spill", [False, True], ids=["memory", "spilled"])
@pytest.mark.parametrize("tile", [8, 5, 37])
def test_upper_tiles_of_symmetric_maps_sum_to_the_whole_maps(tmp_path, spill, tile):
    maps = [_symmetric(s) for s in range(3)]
    want = sum(maps)
    with TileSum(L, tile, max_bytes=0 if spill else None, spill_dir=tmp_path) as acc:
        assert acc.spilled == spill and acc.dtype == np.float32
        for m in maps:
            for i0, i1 in tile_ranges(L, tile):
                acc.add_upper(i0, i1, torch.as_tensor(m[i0:i1, i0:], dtype=torch.float32))
        got = np.concatenate([acc.rows(i0, i1) for i0, i1 in tile_ranges(L, 16)])
        assert list(tmp_path.iterdir()) if spill else not list(tmp_path.iterdir())
    np.testing.assert_allclose(got, want, rtol=0, atol=3 * 2.0**-24 * np.abs(want).max() * 4)
    assert not list(tmp_path.iterdir())  # the spill folder is gone


@pytest.mark.parametrize("spill", [False, True], ids=["memory", "spilled"])
def test_rows_and_unmirrored_upper_parts(tmp_path, spill):
    a, b = _symmetric(5), np.random.default_rng(6).normal(size=(L, L))
    with TileSum(L, 8, max_bytes=0 if spill else None, spill_dir=tmp_path) as whole:
        for i0, i1 in tile_ranges(L, 8):
            whole.add_rows(i0, i1, a[i0:i1])
        np.testing.assert_allclose(whole.rows(0, L), a, rtol=1e-6, atol=1e-6)
    with TileSum(L, 8, mirror=False, dtype=np.float64, max_bytes=0 if spill else None, spill_dir=tmp_path) as up:
        for i0, i1 in tile_ranges(L, 8):
            up.add_upper(i0, i1, b[i0:i1, i0:])
            up.add_upper(i0, i1, b[i0:i1, i0:])
        for i0, i1 in tile_ranges(L, 8):
            np.testing.assert_allclose(up.upper(i0, i1), 2 * b[i0:i1, i0:], rtol=1e-6, atol=1e-6)
            assert np.all(up.rows(i0, i1)[:, :i0] == 0)  # nothing was mirrored below the tiles
        assert up.dtype == (np.float32 if spill else np.float64)


def test_the_size_limit_picks_memory_or_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(accumulate, "MAX_BYTES", 4 * L * L)
    with TileSum(L, 8, spill_dir=tmp_path) as small:
        assert not small.spilled
    with TileSum(L + 1, 8, spill_dir=tmp_path) as big:
        assert big.spilled
