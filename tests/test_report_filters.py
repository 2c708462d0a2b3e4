"""experiments.visualize: every picture is written as a PNG of the documented pixel size, the
tiles hold the normalised filters, feature maps are the net's own intermediate outputs, and the
command line works on our checkpoints. The command line on a torchvision VGG16 .pth is
tests/test_caltech.py::test_visualize_command_line_on_a_torchvision_vgg16_pth (it shares that
file's 528 MB random-weights fixture)."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import nets
from experiments import visualize
from experiments.report import filters as vz
from experiments.transfer import feature_cache as fc
from layers import random as jr

SEEDS = st.integers(0, 2**31 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _png_size(path):
    with Image.open(path) as img:
        return img.size[1], img.size[0]     # (height, width)


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS, out=st.integers(1, 40), k=st.sampled_from([3, 5, 7]), scale=st.integers(1, 6))
def test_first_layer_filters_png_has_the_grid_size_and_each_tile_spans_0_to_255(tmp_path_factory, seed, out, k, scale):
    w = torch.randn(out, 3, k, k, generator=torch.Generator().manual_seed(seed))
    img = vz.first_layer_filters(w, scale=scale)
    cols = int(np.ceil(np.sqrt(out)))
    path = vz.save_png(img, tmp_path_factory.mktemp("v") / "f.png")
    assert _png_size(path) == vz.grid_size(out, (k * scale, k * scale), cols)
    tile = img[1:1 + k * scale, 1:1 + k * scale]            # the first filter, min-max scaled
    assert tile.min() == 0 and tile.max() == 255
    # the tile is the filter itself: its brightest pixel is the filter's largest weight
    arg = np.unravel_index(tile[::scale, ::scale].argmax(), (k, k, 3))
    assert w[0].permute(1, 2, 0)[arg] == w[0].max()


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS, o=st.integers(1, 20), i=st.integers(1, 20))
def test_last_conv_filters_show_min_16_rows_of_min_16_channels(tmp_path_factory, seed, o, i):
    w = torch.randn(o, i, 3, 3, generator=torch.Generator().manual_seed(seed))
    img = vz.last_conv_filters(w, scale=4)
    path = vz.save_png(img, tmp_path_factory.mktemp("v") / "l.png")
    rows, cols = min(o, 16), min(i, 16)
    assert _png_size(path) == vz.grid_size(rows * cols, (12, 12), cols)


def test_last_conv_filters_colour_zero_white_and_extremes_saturated():
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0, 0, 0], w[0, 1, 2, 2] = 2.0, -2.0
    img = vz.last_conv_filters(w, scale=1)
    white = img[1 + 1, 1 + 1]                                  # a zero weight
    assert (white > 240).all()
    red, blue = img[1, 1], img[1 + 2, 1 + 4 + 2]
    assert red[0] > red[2] and blue[2] > blue[0]


def test_feature_map_grid_has_the_grid_size(tmp_path):
    f = torch.randn(20, 8, 8, generator=torch.Generator().manual_seed(0))
    path = vz.save_png(vz.feature_map_grid(f, max_channels=16, scale=3), tmp_path / "m.png")
    assert _png_size(path) == vz.grid_size(16, (24, 24), 4)


def test_weight_histograms_png_is_figsize_times_dpi(tmp_path):
    net = nets.model_b(5)
    params, _ = net.init(jr.key(0))
    size = vz.weight_histograms(params, tmp_path / "h.png", cols=3, panel=(2.0, 1.5), dpi=50)
    n = sum(1 for k, v in params.items() if k.endswith("weight") and v.dim() in (2, 4))
    assert n == 7 and size == (3 * 75, 3 * 100)
    assert _png_size(tmp_path / "h.png") == size


def test_feature_maps_are_the_nets_intermediate_outputs_and_the_last_layer_gives_the_logits():
    net = nets.model_b(5)
    params, state = net.init(jr.key(0))
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = fc.leaf_names(net)
    maps = vz.feature_maps(net, params, state, x, [names[-1], "features.2"])
    logits, _ = net.apply(params, state, x[None], train=False)
    assert torch.equal(maps[names[-1]], logits[0])
    first = fc.run_leaves(net, params, state, x[None], start=0, stop=3, train=False)[0][0]
    assert torch.equal(maps["features.2"], first) and maps["features.2"].shape == (64, 32, 32)
    with pytest.raises(ValueError, match="feature_maps: expected leaf layer names of model_b"):
        vz.feature_maps(net, params, state, x, ["features.99"])


def test_bad_shapes_are_errors_naming_the_function():
    with pytest.raises(ValueError, match=r"first_layer_filters: expected a conv weight \(O, 3, kh, kw\)"):
        vz.first_layer_filters(torch.zeros(4, 2, 3, 3))
    with pytest.raises(ValueError, match="feature_map_grid: expected one image's feature maps"):
        vz.feature_map_grid(torch.zeros(1, 2, 3, 3))


def test_command_line_writes_every_png_for_our_checkpoint(tmp_path, capsys):
    net = nets.model_b(10)
    params, state = net.init(jr.key(0))
    ckpt = tmp_path / "checkpoint.safetensors"
    nets.save(ckpt, {"params": params, "state": state}, {"config": json.dumps({"model": "cifar_model_b"})})
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "figs"
    assert visualize.main(["--checkpoint", str(ckpt), "--image", str(image), "--out", str(out),
                    "--scale", "4"]) == 0
    sizes = {p.name: _png_size(p) for p in out.iterdir()}
    assert sizes == {
        "first_layer_filters.png": vz.grid_size(64, (12, 12), 8),
        "last_conv_filters.png": vz.grid_size(256, (12, 12), 16),
        "weight_histograms.png": (2 * 220, 4 * 300),            # 7 weights, 4 per row
        "input.png": (128, 128),
        "feature_maps_features_2.png": vz.grid_size(16, (128, 128), 4),    # 32x32 maps x 4
        "feature_maps_features_21.png": vz.grid_size(16, (128, 128), 4),   # 8x8 maps x 16
    }


def test_command_line_needs_a_model_for_a_bare_tree_and_checks_its_names(tmp_path, capsys):
    params, state = nets.model_b(10).init(jr.key(0))
    ckpt = tmp_path / "bare.safetensors"
    nets.save(ckpt, {"params": params, "state": state})
    assert visualize.main(["--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "expected --model among" in capsys.readouterr().err
    assert visualize.main(["--checkpoint", str(ckpt), "--model", "cifar_model_a", "--out", str(tmp_path)]) == 2
    assert "expected the parameters of model_a" in capsys.readouterr().err


def test_help_describes_the_entry_point(capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "first_layer_filters.png" in out
