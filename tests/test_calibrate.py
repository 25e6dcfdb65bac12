"""The calibrate command line (d2pruner_kernels/calibrate.py) on hostile folders: one line on
stderr and exit 2 for every user error, outputs written atomically, never unpickling."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from d2pruner_kernels.calibrate import main as calibrate_main
from d2pruner_kernels.prior import PositionalPrior
from helpers import ROOT


def _maps_dir(tmp_path, name="maps"):
    d = tmp_path / name
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(3, 4, 4, generator=g) + 0.1, d / "a.pt")
    save_file({"scores": torch.rand(2, 16, generator=g) + 0.1}, str(d / "b.safetensors"))
    return d


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d2pruner-calibrate: error: "), err
    return err[0]


def _no_files_but(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names), os.listdir(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/d2pruner-pwned-by-calibrate",))


def test_a_pickle_inside_a_pt_file(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    (d / "evil.pt").write_bytes(pickle.dumps(_Payload()))
    out = tmp_path / "p.safetensors"
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "evil.pt" in line and "pickled" in line
    assert not out.exists() and not os.path.exists("/tmp/d2pruner-pwned-by-calibrate")


def test_a_garbage_safetensors_file(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    (d / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    out = tmp_path / "p.safetensors"
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    assert "junk.safetensors" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("where", ["missing folder", "a directory"])
def test_an_out_that_cannot_be_written(tmp_path, capsys, where):
    d = _maps_dir(tmp_path)
    out = tmp_path / "nowhere" / "p.safetensors" if where == "missing folder" else tmp_path
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    assert str(out) in _one_error_line(capsys)
    _no_files_but(tmp_path, ["maps"])


def test_a_bad_png_extension_fails_before_anything_is_written(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    out = tmp_path / "p.safetensors"
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--png",
                           str(tmp_path / "map.xyz"), "--quiet"]) == 2
    assert "--png" in _one_error_line(capsys)
    _no_files_but(tmp_path, ["maps"])


def test_a_failed_run_leaves_an_existing_output_alone(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"previous")
    torch.save(torch.rand(5), d / "c.pt")  # wrong N for the grid
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    assert "c.pt" in _one_error_line(capsys)
    assert out.read_bytes() == b"previous"
    _no_files_but(tmp_path, ["maps", "p.safetensors"])


def test_the_output_inside_the_input_folder_is_not_read_back(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    out, png = d / "prior.safetensors", d / "prior.png"
    args = [str(d), "--grid", "4", "4", "--out", str(out), "--png", str(png), "--quiet"]
    assert calibrate_main(args) == 0
    first = PositionalPrior.load(out)
    capsys.readouterr()
    assert calibrate_main(args) == 0  # again: its own previous output is skipped, said so
    printed = capsys.readouterr()
    assert "skipping" in printed.err and str(out) in printed.err
    assert "5 maps from 2 files" in printed.out
    second = PositionalPrior.load(out)
    assert second.count == first.count == 5 and torch.equal(second.mean, first.mean)
    # another prior file among the inputs is refused, not averaged in as a score map
    first.save(d / "other_prior.safetensors")
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(tmp_path / "x.safetensors"),
                           "--quiet"]) == 2
    assert "other_prior.safetensors is a positional prior" in _one_error_line(capsys)


def test_the_real_command_prints_one_line_and_exits_2(tmp_path):
    d = _maps_dir(tmp_path)
    (d / "evil.pt").write_bytes(pickle.dumps(_Payload()))
    out = subprocess.run([sys.executable, "-m", "d2pruner_kernels.calibrate", str(d), "--grid",
                          "4", "4", "--out", str(tmp_path / "p.safetensors"), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
