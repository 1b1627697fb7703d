"""Visualization helpers: colours by hand, affinity maps against the CTAL stages, PNG grids."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ctal import ops
from ctal.vis import (affinity_map, affinity_row, colorize_depth, colorize_edge, colorize_normals, colorize_semseg,
                      diffusion_map, make_grid, palette, save_grid, visualize_sample)


def test_palette_and_semseg_colours():
    # VOC bit-interleaving: class 1 -> (128, 0, 0), 2 -> (0, 128, 0), 3 -> (128, 128, 0), 8 -> (64, 0, 0)
    pal = palette(9)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0] and pal[3].tolist() == [128, 128, 0] and pal[8].tolist() == [64, 0, 0]
    rgb = colorize_semseg(torch.tensor([[1, -1], [2, 0]]), num_classes=3)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [128, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]   # void -> white
    logits = torch.zeros(3, 1, 1)
    logits[2] = 1.0
    assert colorize_semseg(logits)[0, 0].tolist() == [0, 128, 0]


def test_normals_depth_edge_colours():
    n = torch.zeros(3, 1, 3)
    n[:, 0, 0] = torch.tensor([0.0, 0.0, 2.0])     # normalized to (0, 0, 1) -> (127.5, 127.5, 255) rounded
    n[:, 0, 1] = torch.tensor([-1.0, 0.0, 0.0])    # -> (0, 127.5, 127.5)
    rgb = colorize_normals(n)
    assert rgb[0, 0].tolist() == [128, 128, 255] and rgb[0, 1].tolist() == [0, 128, 128]
    assert rgb[0, 2].tolist() == [0, 0, 0]         # all-zero = invalid
    d = colorize_depth(torch.tensor([[[1.0, 2.0, 0.0]]]))
    assert d[0, 0].tolist() == [253, 231, 37]      # nearest = brightest end of the map
    assert d[0, 1].tolist() == [68, 1, 84]         # farthest = darkest end
    assert d[0, 2].tolist() == [0, 0, 0]           # invalid
    e = colorize_edge(torch.tensor([[[0.0, 1.0, 255.0]]]))
    assert e[0].tolist() == [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    assert colorize_edge(torch.zeros(1, 1, 1), logits=True)[0, 0].tolist() == [128, 128, 128]


def test_affinity_map_hand_computed():
    # one task, C = 2, a 1x3 grid with features (1, 0), (0, 2), (1, 1): cosines from pixel 0 are 1, 0, 1/sqrt 2
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]]).view(1, 1, 2, 1, 3)
    a = affinity_map(x, (0, 0))
    assert a.shape == (1, 1, 3)
    torch.testing.assert_close(a[0, 0], torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]))
    # the direct row (used for large grids) agrees with the ops stage
    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(affinity_map(x, (3, 2), batch_index=1),
                               affinity_map(x, (3, 2), batch_index=1, max_full=1))
    with pytest.raises(ValueError, match="outside"):
        affinity_map(x, (5, 0))


def test_diffusion_map_is_a_row_of_the_ctal_diffusion():
    torch.manual_seed(0)
    B, T, C, H, W = 1, 2, 3, 4, 5
    x = torch.randn(B, T, C, H, W, dtype=torch.float64)
    w = torch.randn(H * W, T, 3, 3, dtype=torch.float64)
    b = torch.randn(H * W, dtype=torch.float64)
    m = ops.diffuse(ops.align(ops.affinity(x), (H, W)), w, b)        # (B, N, N)
    y, xx = 2, 3
    row = diffusion_map(x, w, b, (y, xx))
    torch.testing.assert_close(row, m[0, y * W + xx].view(H, W))


def test_grid_png(tmp_path):
    tile = np.zeros((4, 5, 3), np.uint8)
    path = save_grid([[tile, tile], [tile]], tmp_path / "sub" / "grid.png", pad=2)
    im = np.array(Image.open(path))
    assert im.shape == (2 * (4 + 2) + 2, 2 * (5 + 2) + 2, 3)
    assert im[0, 0].tolist() == [255, 255, 255] and im[2, 2].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="tile"):
        make_grid([[tile, np.zeros((3, 5, 3), np.uint8)]])


def test_visualize_sample_rows(tmp_path):
    sample = {"image": torch.zeros(2, 3, 4, 5), "semseg": torch.zeros(2, 4, 5, dtype=torch.long),
              "depth": torch.ones(2, 1, 4, 5), "normals": torch.ones(2, 3, 4, 5), "edge": torch.zeros(2, 1, 4, 5)}
    pred = {"final": {"semseg": torch.randn(2, 3, 4, 5), "depth": torch.ones(2, 1, 4, 5),
                      "normals": torch.randn(2, 3, 4, 5), "edge": torch.randn(2, 1, 4, 5)}, "aux": {}}
    rows = visualize_sample(sample, pred, {"semseg": 3}, index=1)
    assert len(rows) == 2 and len(rows[0]) == 5 and len(rows[1]) == 5
    assert save_grid(rows, tmp_path / "s.png").is_file()


def test_affinity_row_tiles(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 3, 5)
    w, b = torch.randn(15, 2, 3, 3), torch.randn(15)
    row = affinity_row(x, (1, 2), w, b, size=(6, 10))
    assert len(row) == 3 and all(t.shape == (6, 10, 3) and t.dtype == np.uint8 for t in row)
    # the query pixel has affinity 1 with itself: the top of the diverging map, marked black
    plain = affinity_row(x, (1, 2))
    assert plain[0][1, 2].tolist() == [0, 0, 0]
    assert plain[0][0, 2].tolist() == [255, 255, 255]
    assert save_grid([row], tmp_path / "aff.png").is_file()
