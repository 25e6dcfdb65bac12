"""PositionalPrior (running mean, safetensors files, transforms, refusals) and the
calibration command line."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import d2pruner_kernels as d2p
from d2pruner_kernels import prune
from d2pruner_kernels.calibrate import main as calibrate_main
from d2pruner_kernels.prior import PositionalPrior
from helpers import run_json


def _maps(*shape, seed=0, lo=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) + lo  # positive, never zero


def test_running_mean_equals_mean_over_all_maps():
    prior = PositionalPrior((6, 5), model="m", layer=3, query="last")
    batches = [_maps(30, seed=1), _maps(4, 30, seed=2), _maps(7, 6, 5, seed=3),
               _maps(6, 5, seed=4), _maps(1, 30, seed=5).to(torch.float16),
               _maps(0, 30, seed=6)]
    for batch in batches:
        assert prior.update(batch) is prior
    every = torch.cat([b.double().reshape(-1, 30) for b in batches])
    assert prior.count == every.shape[0] == 14
    torch.testing.assert_close(prior.mean, every.mean(dim=0), rtol=1e-13, atol=0)
    assert prior.mean.dtype == torch.float64
    torch.testing.assert_close(prior.as_map(), every.mean(dim=0).reshape(6, 5))
    t = prior.as_tensor()
    assert t.dtype == torch.float32 and t.shape == (30,)
    assert prior.as_tensor(dtype=torch.float64).dtype == torch.float64


def test_running_mean_3d_grid_and_bad_maps():
    prior = PositionalPrior((2, 3, 4))
    a, b = _maps(2, 3, 4, seed=1), _maps(5, 2, 3, 4, seed=2)
    prior.update(a).update(b).update(_maps(24, seed=3))
    every = torch.cat([a.reshape(1, 24), b.reshape(5, 24), _maps(1, 24, seed=3)]).double()
    torch.testing.assert_close(prior.mean, every.mean(0), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match=r"score_maps must be .* for grid \(2, 3, 4\) \(N=24\), got shape \[3, 4\]"):
        prior.update(_maps(3, 4))
    with pytest.raises(ValueError, match=r"got shape \[2, 2, 2, 3, 4\]"):
        prior.update(_maps(2, 2, 2, 3, 4))
    with pytest.raises(TypeError, match=r"floating-point tensor, got torch.int64"):
        prior.update(torch.ones(24, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"must be a torch.Tensor, got list"):
        prior.update([1.0] * 24)
    bad = _maps(3, 24, seed=4)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf values \(maps \[1\]"):
        prior.update(bad)
    assert prior.count == 7  # a refused batch changes nothing


def test_refuses_empty_non_positive_non_finite(tmp_path):
    with pytest.raises(ValueError, match=r"has no data"):
        PositionalPrior((3, 3)).as_tensor()
    neg = PositionalPrior((3, 3)).update(_maps(4, 9, seed=1) - 0.5)
    with pytest.raises(ValueError, match=r"must be positive everywhere .* at token"):
        neg.as_tensor()
    with pytest.raises(ValueError, match=r"must be positive"):
        neg.save(tmp_path / "neg.safetensors")
    assert not (tmp_path / "neg.safetensors").exists()
    # finite maps whose mean overflows float64
    huge = PositionalPrior((3, 3)).update(torch.full((2, 9), 1e308, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        huge.as_tensor(device="cpu")
    with pytest.raises(ValueError, match=r"grid entries must be >= 1, got 0"):
        PositionalPrior((3, 0))
    with pytest.raises(TypeError, match=r"grid must be a tuple"):
        PositionalPrior(9)


def test_prune_takes_a_prior_object():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 36, 16, generator=g)
    attn = torch.rand(2, 4, 36, generator=g) + 0.01
    prior = PositionalPrior((6, 6)).update(_maps(10, 6, 6, seed=9))
    want = prune(tokens, attn, (6, 6), 12, prior=prior.as_tensor(), backend="reference")
    got = prune(tokens, attn, (6, 6), 12, prior=prior, backend="reference")
    assert torch.equal(got, want)
    assert not torch.equal(want, prune(tokens, attn, (6, 6), 12, backend="reference"))
    with pytest.raises(ValueError, match=r"has no data"):
        prune(tokens, attn, (6, 6), 12, prior=PositionalPrior((6, 6)))


def test_save_load_round_trip(tmp_path):
    prior = PositionalPrior((4, 6), model="llava-1.5-7b", layer=1, query="last")
    prior.update(_maps(17, 4, 6, seed=5))
    path = tmp_path / "p.safetensors"
    prior.save(path)
    back = PositionalPrior.load(path, expected_grid=(4, 6))
    assert torch.equal(back.mean, prior.mean)  # float64, bit for bit
    assert (back.grid, back.count, back.model, back.layer, back.query) == \
           ((4, 6), 17, "llava-1.5-7b", 1, "last")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["grid"] == "4,6" and meta["count"] == "17" and meta["query"] == "last"
    # a derived prior keeps its provenance and records the transform
    tiled = prior.resized((8, 12)).tiled(2)
    tiled.save(tmp_path / "t.safetensors")
    back = PositionalPrior.load(tmp_path / "t.safetensors", expected_grid=[3, 8, 12])
    assert back.layer == 1 and back.transforms == "resized 4,6->8,12; tiled 2+thumbnail"
    assert torch.equal(back.mean, tiled.mean)


def test_load_refuses_mismatch_and_foreign_files(tmp_path):
    prior = PositionalPrior((4, 6)).update(_maps(3, 24, seed=1))
    path = tmp_path / "p.safetensors"
    prior.save(path)
    with pytest.raises(ValueError, match=r"holds a prior for grid \(4, 6\), expected grid \(6, 4\)"):
        PositionalPrior.load(path, expected_grid=(6, 4))
    # a safetensors file that is not a prior
    other = tmp_path / "other.safetensors"
    save_file({"mean": torch.rand(24, dtype=torch.float64)}, str(other))
    with pytest.raises(ValueError, match=r"not a positional prior"):
        PositionalPrior.load(other)
    # a pickle whose loading would run code: refused, and the code never runs
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"is not a safetensors positional prior"):
        PositionalPrior.load(evil)
    assert not marker.exists()
    torch_file = tmp_path / "prior.pt"
    torch.save({"mean": prior.mean}, torch_file)
    with pytest.raises(ValueError, match=r"is not a safetensors positional prior"):
        PositionalPrior.load(torch_file)


def test_resize_constant_and_ramp():
    const = PositionalPrior((5, 7)).update(torch.full((3, 35), 0.25))
    for grid in ((10, 14), (3, 4), (5, 7), (24, 2)):
        out = const.resized(grid)
        assert out.grid == grid and out.count == 3
        torch.testing.assert_close(out.mean, torch.full((grid[0] * grid[1],), 0.25,
                                                        dtype=torch.float64))
    # f(y, x) = 1 + 0.5 y + 0.25 x: bilinear gives f at the source coordinate
    # (i + 0.5) * H / H' - 0.5, clamped to [0, H - 1] (align_corners=False, documented)
    h, w = 6, 8
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                          torch.arange(w, dtype=torch.float64), indexing="ij")
    ramp = PositionalPrior((h, w)).update((1 + 0.5 * y + 0.25 * x).reshape(1, -1))
    for nh, nw in ((12, 16), (3, 4), (9, 5)):
        ys = ((torch.arange(nh, dtype=torch.float64) + 0.5) * h / nh - 0.5).clamp(0, h - 1)
        xs = ((torch.arange(nw, dtype=torch.float64) + 0.5) * w / nw - 0.5).clamp(0, w - 1)
        want = 1 + 0.5 * ys[:, None] + 0.25 * xs[None, :]
        torch.testing.assert_close(ramp.resized((nh, nw)).as_map(), want, rtol=1e-12, atol=1e-12)
    # frames are resampled independently; T must stay
    video = ramp.per_frame(3)
    out = video.resized((3, 12, 16)).as_map()
    for t in range(3):
        torch.testing.assert_close(out[t], ramp.resized((12, 16)).as_map())
    with pytest.raises(ValueError, match=r"keeps the number of frames"):
        video.resized((2, 12, 16))
    with pytest.raises(ValueError, match=r"keeps the number of frames"):
        ramp.resized((2, 12, 16))


def test_tiles_and_frames():
    base = PositionalPrior((3, 4), model="internvl", layer=0, query="cls")
    base.update(_maps(5, 3, 4, seed=2))
    m = base.as_map()
    tiles = base.tiled(4)
    assert tiles.grid == (5, 3, 4) and tiles.count == 5 and tiles.model == "internvl"
    assert torch.equal(tiles.as_map(), m.expand(5, 3, 4))
    assert base.tiled(6, thumbnail=False).grid == (6, 3, 4)
    frames = base.per_frame(8)
    assert frames.grid == (8, 3, 4) and frames.as_tensor().shape == (96,)
    assert torch.equal(frames.as_map(), m.expand(8, 3, 4))
    with pytest.raises(ValueError, match=r"tiled\(\) needs a 2-D \(H, W\) prior"):
        frames.tiled(2)
    with pytest.raises(ValueError, match=r"per_frame\(\) needs a 2-D"):
        tiles.per_frame(2)
    with pytest.raises(ValueError, match=r"n_tiles must be >= 1, got 0"):
        base.tiled(0)
    with pytest.raises(TypeError, match=r"n_tiles must be an int, got float 2.5"):
        base.tiled(2.5)
    with pytest.raises(ValueError, match=r"t must be >= 1, got -1"):
        base.per_frame(-1)
    with pytest.raises(ValueError, match=r"has no data"):
        PositionalPrior((3, 4)).tiled(2)


def test_cli_end_to_end(tmp_path, capsys):
    from PIL import Image
    maps_dir = tmp_path / "maps"
    maps_dir.mkdir()
    a, b, c = _maps(5, 6, 8, seed=1), _maps(3, 48, seed=2), _maps(48, seed=3)
    torch.save(a, maps_dir / "a.pt")
    save_file({"scores": b, "ids": torch.arange(3)}, str(maps_dir / "b.safetensors"))
    torch.save({"anything": c}, maps_dir / "c.pt")
    (maps_dir / "notes.txt").write_text("ignored")
    out, png = tmp_path / "prior.safetensors", tmp_path / "map.png"
    rc = calibrate_main([str(maps_dir), "--grid", "6", "8", "--out", str(out), "--png", str(png),
                         "--model", "llava", "--layer", "2", "--query", "last"])
    assert rc == 0
    printed = capsys.readouterr()
    every = torch.cat([a.reshape(-1, 48), b, c.reshape(1, 48)]).double().mean(0)
    assert "9 maps from 3 files" in printed.out
    assert f"min {every.min().item():.6g}" in printed.out
    assert f"max {every.max().item():.6g}" in printed.out
    assert "calibrating" in printed.err  # the progress bar
    prior = PositionalPrior.load(out, expected_grid=(6, 8))
    assert (prior.count, prior.model, prior.layer, prior.query) == (9, "llava", 2, "last")
    torch.testing.assert_close(prior.mean, every, rtol=1e-13, atol=0)
    with Image.open(png) as img:
        assert img.mode == "L" and img.width >= 256 and img.width * 6 == img.height * 8
        px = torch.from_numpy(np.array(img))
    assert px.shape == (img.height, img.width)
    assert px.min() == 0 and px.max() == 255
    cell = img.width // 8
    y, x = divmod(int(every.argmax()), 8)
    assert px[y * cell, x * cell] == 255


def test_cli_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert calibrate_main([str(empty), "--grid", "4", "4", "--out", str(tmp_path / "p")]) == 2
    assert "no .pt or .safetensors files" in capsys.readouterr().err
    d = tmp_path / "d"
    d.mkdir()
    torch.save(_maps(2, 4, 4, seed=1), d / "x.pt")
    assert calibrate_main([str(d), "--grid", "4", "5", "--out", str(tmp_path / "p"),
                           "--quiet"]) == 2
    assert "x.pt: score_maps must be" in capsys.readouterr().err
    torch.save(-_maps(2, 16, seed=2), d / "y.pt")
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(tmp_path / "p"),
                           "--quiet"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p")


# -- nothing handed out changes the original (issue 21, item 3) ---------------------------------

def _varlen_keep(prior, grids, seed=0):
    """What prune_varlen keeps with `prior` for images on `grids` (fixed inputs)."""
    from d2pruner_kernels import prune_varlen
    g = torch.Generator().manual_seed(seed)
    lengths = [int(np.prod(grid)) for grid in grids]
    tokens = torch.randn(sum(lengths), 8, generator=g)
    attn = torch.rand(sum(lengths), generator=g) + 0.01
    cu = torch.tensor(np.cumsum([0] + lengths))
    return prune_varlen(tokens, attn, cu, grids, 0.25, prior=prior, backend="reference")[0]


@pytest.mark.parametrize("grid", [(6, 6), (4, 5), (3, 6, 6), (2, 4, 5)])
def test_for_grid_hands_out_a_copy_that_never_changes_the_original(grid):
    prior = PositionalPrior((6, 6)).update(_maps(4, 36, seed=3))
    mean = prior.mean
    before = _varlen_keep(prior, [grid, (6, 6)])
    derived = prior.for_grid(grid).as_tensor()  # also fills the caches the copy shares
    out = prior.for_grid(grid)
    out.update(_maps(50, out.n, seed=4, lo=0.0) * 100)  # a very different map
    assert not torch.equal(out.as_tensor(), derived)
    assert torch.equal(prior.mean, mean) and prior.count == 4
    assert torch.equal(prior.for_grid(grid).as_tensor(), derived)
    assert torch.equal(_varlen_keep(prior, [grid, (6, 6)]), before)
    # and the other way: updating the original leaves a copy it handed out as it was
    kept = prior.for_grid(grid)
    prior.update(_maps(50, 36, seed=5) * 100)
    assert torch.equal(kept.as_tensor(), derived)
    assert not torch.equal(prior.for_grid(grid).as_tensor(), derived)


# -- torch.compile(fullgraph=True) with a PositionalPrior, cold (issue 21, item 6) ---------------

def test_compile_fullgraph_with_a_prior_object_cold():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 48, 16, generator=g)
    attn = torch.rand(2, 3, 48, generator=g) + 0.01
    prior = PositionalPrior((6, 8)).update(_maps(4, 48, seed=6))
    assert not prior._device_copies  # cold: no device copy made yet

    def model(t, a):
        return prune(t, a, (6, 8), 12, prior=prior)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(tokens, attn)
    assert torch.equal(got, prune(tokens, attn, (6, 8), 12, prior=prior.as_tensor()))
    assert not torch.equal(got, prune(tokens, attn, (6, 8), 12))  # the prior mattered
    prior.update(_maps(40, 48, seed=7) * 50)  # new data: the compiled call follows it
    assert torch.equal(compiled(tokens, attn),
                       prune(tokens, attn, (6, 8), 12, prior=prior.as_tensor()))


# -- PositionalPrior.load on malformed files ------------------------------------------------------------------

def _prior_file(path, mean=None, **meta):
    base = {"format": "d2pruner-positional-prior", "version": "1", "grid": "4,6",
            "count": "3", "model": "", "layer": "", "query": "", "transforms": ""}
    base.update(meta)
    tensors = {"mean": torch.rand(24, dtype=torch.float64) + 0.5 if mean is None else mean}
    save_file(tensors, str(path), metadata={k: v for k, v in base.items() if v is not None})
    return path


def test_a_huge_grid_is_refused_before_allocating(tmp_path):
    path = _prior_file(tmp_path / "huge.safetensors", grid="20000,20000")
    assert path.stat().st_size < 1000
    got = run_json(f"""
        import json, resource
        from d2pruner_kernels.prior import PositionalPrior
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            PositionalPrior.load({str(path)!r})
            err = None
        except Exception as e:
            err = [type(e).__name__, str(e)]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps([err, grown // 1024]))
    """)
    (err, grown_mb) = got
    assert err[0] == "ValueError" and str(path) in err[1] and "grid" in err[1], err
    assert grown_mb < 200, f"load allocated {grown_mb} MB for a {path.stat().st_size}-byte file"


@pytest.mark.parametrize("meta,field", [
    (dict(grid="1000000,1000000"), "grid"),   # was the allocator's RuntimeError
    (dict(grid="5"), "grid"),                 # was TypeError
    (dict(grid="0,24"), "grid"),              # was ValueError without the path
    (dict(grid="4,6,1,1"), "grid"),
    (dict(grid="4, 6"), "grid"),
    (dict(grid="-4,-6"), "grid"),
    (dict(grid="4,x"), "grid"),
    (dict(grid="9" * 5000 + ",1"), "grid"),
    (dict(grid="3,6"), "grid"),               # 18 cells, the tensor has 24
    (dict(grid=None), "grid"),
    (dict(count="-1"), "count"),              # loaded, then update() divided by zero
    (dict(count="0"), "count"),
    (dict(count="1.5"), "count"),
    (dict(count=None), "count"),
    (dict(layer="one"), "layer"),
    (dict(version="2"), "version"),
])
def test_malformed_metadata_names_the_path_and_the_field(tmp_path, meta, field):
    path = _prior_file(tmp_path / "p.safetensors", **meta)
    with pytest.raises(ValueError) as info:
        PositionalPrior.load(path)
    assert str(path) in str(info.value) and field in str(info.value), info.value


@pytest.mark.parametrize("tensors,field", [
    ({"mean": torch.rand(24, dtype=torch.float64) + 1, "extra": torch.zeros(3)}, "tensors"),
    ({"mean": torch.rand(24) + 1}, "mean"),                        # float32
    ({"mean": torch.rand(4, 6, dtype=torch.float64) + 1}, "mean"),  # 2-D
    ({"mean": -torch.rand(24, dtype=torch.float64)}, "mean"),       # not positive
    ({"mean": torch.full((24,), float("nan"), dtype=torch.float64)}, "mean"),
])
def test_malformed_tensors_name_the_path_and_the_field(tmp_path, tensors, field):
    path = tmp_path / "p.safetensors"
    save_file(tensors, str(path), metadata={"format": "d2pruner-positional-prior",
                                            "version": "1", "grid": "4,6", "count": "3"})
    with pytest.raises(ValueError) as info:
        PositionalPrior.load(path)
    assert str(path) in str(info.value) and field in str(info.value), info.value


def test_a_good_file_still_loads(tmp_path):
    prior = PositionalPrior((2, 3, 4), layer=-1).update(torch.rand(5, 24) + 0.1)
    prior.save(tmp_path / "p.safetensors")
    back = PositionalPrior.load(tmp_path / "p.safetensors", expected_grid=(2, 3, 4))
    assert back.count == 5 and back.layer == -1 and torch.equal(back.mean, prior.mean)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic save


def test_as_tensor_hands_out_a_copy():
    X = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))
    A = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(6)) + 0.01
    prior = PositionalPrior((4, 4)).update(torch.rand(3, 16) + 0.2)
    want = d2p.prune(X, A, (4, 4), 6, prior=prior.mean.float())
    t = prior.as_tensor()
    t.fill_(-1.0)  # an in-place edit of what as_tensor() returned...
    assert torch.equal(d2p.prune(X, A, (4, 4), 6, prior=prior), want)  # ...changes nothing
    assert (prior.as_tensor() > 0).all()
