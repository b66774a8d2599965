"""Ingest of tiles and stacks: real data and every bad input of issue 2."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline_core import store
from pipeline_core.ingest import ingest_stack, ingest_tiles, read_tiles
from pipeline_core.project import Project

from click.testing import CliRunner

from launch.cli import main as cli_main


class _Result:
    def __init__(self, r):
        self.returncode = r.exit_code
        self.stdout = r.stdout
        self.stderr = r.stderr


def emloop(*args):
    """Run the emloop CLI in-process (same code path as the console script)."""
    return _Result(CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False))


def _write_tiles(folder: Path, n_sections=2, grid=(2, 2), size=64, overlap=16, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_sections):
        for r in range(grid[0]):
            for c in range(grid[1]):
                a = (rng.random((size, size)) * (255 if dtype == np.uint8 else 65535)).astype(dtype)
                name = f"s{s}_r{r}c{c}.tif"
                tifffile.imwrite(folder / name, a)
                rows.append([s, f"r{r}c{c}", name, c * (size - overlap), r * (size - overlap)])
    return rows


def _write_csv(path: Path, rows, header=("section", "tile", "path", "x", "y")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _assert_nothing_recorded(root: Path):
    st = json.loads(emloop("status", root, "--json").stdout)
    assert st["products"] == [] and st["runs"] == []


@pytest.fixture
def proj(tmp_path):
    assert emloop("init", tmp_path / "p").returncode == 0
    return tmp_path / "p"


def test_ingest_tiles_roundtrip(proj, tmp_path):
    rows = _write_tiles(tmp_path / "t", dtype=np.uint16)
    csvp = _write_csv(tmp_path / "t" / "positions.csv", rows)
    r = emloop("ingest", "tiles", proj, "--positions", csvp)
    assert r.returncode == 0, r.stderr
    st = json.loads(emloop("status", proj, "--json").stdout)
    (p,) = st["products"]
    assert p["kind"] == "raw_tiles" and p["review_state"] == "approved" and p["shape"] == [2, 4, 64, 64]
    t = read_tiles(p["abspath"])
    assert t["tiles"].dtype == np.uint16
    assert np.allclose(t["stage_positions"][0, 1], (0, 48))
    assert t["meta"]["grid"] == [2, 2]
    (rv,) = [e for e in st["runs"]]
    assert rv["review_state"] == "approved"


@pytest.mark.parametrize("case", ["missing_column", "nonnumeric", "duplicate", "missing_file", "corrupt",
                                  "truncated", "shape", "confine", "nan_position"])
def test_bad_tiles_input_one_line_error(case, proj, tmp_path):
    folder = tmp_path / "t"
    rows = _write_tiles(folder)
    header = ("section", "tile", "path", "x", "y")
    expect = None
    if case == "missing_column":
        header = ("section", "tile", "path", "x")
        rows = [r[:4] for r in rows]
        expect = "positions.csv: missing column(s) y"
    elif case == "nonnumeric":
        rows[2][3] = "abc"
        expect = "positions.csv row 4: x 'abc' is not a number"
    elif case == "nan_position":
        rows[1][4] = "nan"
        expect = "positions.csv row 3: y 'nan' is not a finite number"
    elif case == "duplicate":
        rows[3][1] = rows[2][1]
        expect = "positions.csv row 5: duplicate (section 0, tile r1c0), first at row 4"
    elif case == "missing_file":
        rows[5][2] = "nope.tif"
        expect = "positions.csv row 7: tile file nope.tif does not exist"
    elif case == "corrupt":
        (folder / rows[1][2]).write_bytes(b"II*\x00garbage" * 10)
        expect = f"{rows[1][2]}: cannot read image"
    elif case == "truncated":
        data = (folder / rows[1][2]).read_bytes()
        (folder / rows[1][2]).write_bytes(data[: len(data) // 3])
        expect = f"{rows[1][2]}: cannot read image"
    elif case == "shape":
        tifffile.imwrite(folder / rows[6][2], np.zeros((50, 64), np.uint8))
        expect = "(section 1, tile r1c0): shape 50x64 differs from section 1's other tiles"
    elif case == "confine":
        outside = tmp_path / "outside.tif"
        tifffile.imwrite(outside, np.zeros((64, 64), np.uint8))
        rows[0][2] = "../outside.tif"
        expect = "positions.csv row 2: path '../outside.tif' points outside"
    csvp = _write_csv(folder / "positions.csv", rows, header)
    args = ["ingest", "tiles", proj, "--positions", csvp] + (["--confine"] if case == "confine" else [])
    r = emloop(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expect in lines[0], lines[0]
    _assert_nothing_recorded(proj)


@pytest.mark.parametrize("case", ["nan", "empty", "voxel_zero", "voxel_negative", "labels_shape", "corrupt"])
def test_bad_stack_input_one_line_error(case, proj, tmp_path):
    img = tmp_path / "stack.tif"
    a = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    vs = "40,8,8"
    extra = []
    if case == "nan":
        a[1, 2, 3] = np.nan
        expect = "NaN/inf"
    elif case == "empty":
        a = np.zeros((0, 32, 32), np.float32)
        expect = "empty stack"
    elif case == "voxel_zero":
        vs, expect = "0,8,8", "--voxel-size must be > 0"
    elif case == "voxel_negative":
        vs, expect = "40,-8,8", "--voxel-size must be > 0"
    elif case == "labels_shape":
        lab = tmp_path / "lab.tif"
        tifffile.imwrite(lab, np.ones((4, 32, 31), np.uint32), photometric='minisblack')
        extra, expect = ["--labels", lab], "differs from --image shape"
    if case == "corrupt":
        img.write_bytes(b"not a tiff at all")
        expect = "cannot read stack"
    else:
        tifffile.imwrite(img, a, photometric='minisblack')
    r = emloop("ingest", "stack", proj, "--image", img, "--voxel-size", vs, *extra)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    _assert_nothing_recorded(proj)


def test_project_path_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for args in (["init", f], ["status", f]):
        r = emloop(*args)
        assert r.returncode != 0
        assert r.stderr.strip() == f"error: project path {f} is a file, not a folder"


def test_real_render_tiles_positions_from_summary(shared_data, tmp_path):
    d = shared_data / "montage_render" / "perftest_4tiles_level1"
    summary = json.loads((d / "positions_summary.json").read_text())
    rows = []
    for t in summary["tiles"]:
        x, y = t["approx_translation_level1"]
        rows.append([0, t["tileId"], str(d / t["image_level1"]), x, y])
    csvp = _write_csv(tmp_path / "positions.csv", rows)
    p = Project.init(tmp_path / "real")
    rid, pid = ingest_tiles(p, csvp, voxel_size=(40, 8, 8), user="tester")
    t = read_tiles(p.abspath(p.catalog.product(pid).path))
    assert t["tiles"].shape == (1, 4, 1080, 1280)
    assert t["meta"]["grid"] == [2, 2]
    assert p.catalog.reviews(rid)[0].user == "tester"


def test_real_isbi_stack(shared_data, tmp_path):
    p = Project.init(tmp_path / "isbi")
    out = ingest_stack(p, shared_data / "isbi2012" / "train_raw.tif", voxel_size="50,4,4", as_="sections",
                       user="tester")
    rid, pid = out["image"]
    prod = p.catalog.product(pid)
    assert prod.kind == "montage" and prod.shape == [30, 512, 512]
    g = zarr.open_group(str(p.abspath(prod.path)), mode="r")
    assert g.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [50, 4, 4]
    assert store.read_meta(p.abspath(prod.path)).complete
    # next stage is align: the gate is open because ingest counts as approval
    p.catalog.create_run("align", inputs=[pid], user="tester")


def test_real_fib_stack_with_labels(shared_data, tmp_path):
    p = Project.init(tmp_path / "fib")
    d = shared_data / "gala_fib_small"
    out = ingest_stack(p, d / "train_raw.tif", labels=d / "train_gt_neuron_ids.tif", voxel_size="10,10,10")
    assert p.catalog.product(out["image"][1]).kind == "aligned"
    lp = p.catalog.product(out["labels"][1])
    assert lp.kind == "labels"
    lab = store.read_volume(p.abspath(lp.path))
    assert np.array_equal(lab, tifffile.imread(d / "train_gt_neuron_ids.tif"))
