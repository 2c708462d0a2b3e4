"""experiments.visualize: every picture is written as a PNG of the documented pixel size, the
tiles hold the normalised filters, the filter pictures are enlarged and titled with their layer
and shape, feature maps are the net's own intermediate outputs, and the command line works on our
checkpoints and run folders, writes into the run by default and decodes only the image it shows.
The command line on a torchvision VGG16 .pth is
tests/test_transfer_caltech.py::test_visualize_command_line_on_a_torchvision_vgg16_pth (it shares
that file's 528 MB random-weights fixture)."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import nets
from experiments import visualize
from experiments.data import cifar10
from experiments.report import filters as vz
from layers import random as jr
from test_data_cifar10 import write_batches, write_folder

SEEDS = st.integers(0, 2**31 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _png_size(path):
    with Image.open(path) as img:
        return img.size[1], img.size[0]     # (height, width)


def _png_title(path):
    with Image.open(path) as img:
        return img.text.get("Title")


def _png_pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _model_b_checkpoint(path, config=True):
    """A model_b(10) checkpoint at ``path``, with a config naming its model when ``config``."""
    params, state = nets.model_b(10).init(jr.key(0))
    meta = {"config": json.dumps({"model": "cifar_model_b"})} if config else None
    nets.save(path, {"params": params, "state": state}, meta)
    return path


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
    # the tile is the filter itself: the filter's largest weight is drawn at 255 in its place
    # (not "the first 255 pixel is the largest weight": two weights within 1/255 of the range
    # both round to 255)
    arg = np.unravel_index(int(w[0].permute(1, 2, 0).argmax()), (k, k, 3))
    assert tile[::scale, ::scale][arg] == 255


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
    names = nets.leaf_names(net)
    maps = vz.feature_maps(net, params, state, x, [names[-1], "features.2"])
    logits, _ = net.apply(params, state, x[None], train=False)
    assert torch.equal(maps[names[-1]], logits[0])
    prefix = nets.cut(net, upto="features.2")
    first = prefix.apply({k: params[k] for k in prefix.layer.param_shapes},
                         {k: state[k] for k in prefix.layer.state_shapes}, x[None], train=False)[0][0]
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
        "first_layer_filters.png": vz.titled_size(vz.grid_size(64, (12, 12), 8)),
        "last_conv_filters.png": vz.titled_size(vz.grid_size(256, (12, 12), 16)),
        "weight_histograms.png": (2 * 220, 4 * 300),            # 7 weights, 4 per row
        "input.png": (128, 128),
        "feature_maps_features_2.png": vz.grid_size(16, (128, 128), 4),    # 32x32 maps x 4
        "feature_maps_features_21.png": vz.grid_size(16, (128, 128), 4),   # 8x8 maps x 16
    }
    assert _png_title(out / "first_layer_filters.png") == "features.0.weight (64, 3, 3, 3)"
    assert _png_title(out / "last_conv_filters.png") == "features.19.weight (256, 256, 3, 3): first 16 filters x 16 input channels"
    # a 3x3 first-layer filter is drawn at least 16 px per weight, the picture >= 512 px wide
    assert sizes["first_layer_filters.png"][1] >= vz.MIN_WIDTH
    assert sizes["first_layer_filters.png"][1] // vz.grid_size(64, (12, 12), 8)[1] * 4 >= 16


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


# --------------------------------------------------------------------------------------------
# Readable filter pictures: enlarged, titled with layer and shape


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS, h=st.integers(1, 700), w=st.integers(1, 700), band=st.integers(16, 40),
       min_width=st.sampled_from([256, 512, 800]))
def test_titled_enlarges_by_a_whole_factor_to_min_width_below_a_band_holding_the_title(seed, h, w, band, min_width):
    grid = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = vz.titled(grid, "features.0.weight (64, 3, 3, 3)", min_width=min_width, band=band)
    f = max(1, -(-min_width // w))
    assert out.shape == (*vz.titled_size((h, w), min_width=min_width, band=band), 3)
    assert out.shape[:2] == (band + f * h, f * w) and out.shape[1] >= min(min_width, f * w)
    assert np.array_equal(out[band:], grid.repeat(f, 0).repeat(f, 1))     # nearest neighbour
    ink = out[:band].min(-1) < 128
    assert ink.any() and not ink[:, :2].any() and not ink[:, -2:].any()  # drawn, and inside


def test_titled_writes_the_title_it_is_given_and_fits_a_long_one_in_the_width():
    grid = np.full((10, 100, 3), 255, np.uint8)
    a = vz.titled(grid, "features.0.weight (64, 3, 3, 3)")
    b = vz.titled(grid, "features.3.weight (64, 64, 3, 3)")
    assert a.shape == b.shape and not np.array_equal(a[:vz.TITLE_BAND], b[:vz.TITLE_BAND])
    long = vz.titled(grid, "classifier.features.44.weight " * 6)
    ink = long[:vz.TITLE_BAND].min(-1) < 128
    assert ink.any() and not ink[:, :2].any() and not ink[:, -2:].any()
    with pytest.raises(ValueError, match="titled: expected a uint8 image"):
        vz.titled(np.zeros((3, 3)), "x")


def test_filter_titles_name_the_layer_and_the_weight_shape_and_what_is_shown():
    w = torch.zeros(512, 256, 3, 3)
    assert vz.filter_title("features.0.weight", torch.zeros(64, 3, 3, 3)) == "features.0.weight (64, 3, 3, 3)"
    assert vz.filter_title("f.w", w, (16, 16)) == "f.w (512, 256, 3, 3): first 16 filters x 16 input channels"
    assert vz.filter_title("f.w", w[:16, :16], (16, 16)) == "f.w (16, 16, 3, 3)"


def test_filter_figures_are_the_titled_grids_of_the_first_and_last_conv():
    params, _ = nets.model_b(10).init(jr.key(0))
    figs = vz.filter_figures(params, scale=2)
    first, last = params["features.0.weight"], params["features.19.weight"]
    assert figs["first_layer_filters"][1] == "features.0.weight (64, 3, 3, 3)"
    assert np.array_equal(figs["first_layer_filters"][0],
                          vz.titled(vz.first_layer_filters(first, scale=2), figs["first_layer_filters"][1]))
    assert np.array_equal(figs["last_conv_filters"][0],
                          vz.titled(vz.last_conv_filters(last, scale=2), figs["last_conv_filters"][1]))


# --------------------------------------------------------------------------------------------
# The command line: run folders, the default --out, one decoded CIFAR-10 image


def test_command_line_takes_a_run_folder_and_writes_into_its_figures_folder(tmp_path, capsys):
    run = tmp_path / "runs" / "b"
    run.mkdir(parents=True)
    _model_b_checkpoint(run / "checkpoint.safetensors")
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert visualize.main(["--checkpoint", str(run), "--image", str(image)]) == 0
    names = {"first_layer_filters.png", "last_conv_filters.png", "weight_histograms.png", "input.png",
             "feature_maps_features_2.png", "feature_maps_features_21.png"}
    assert {p.name for p in (run / "figures").iterdir()} == names
    # a bare checkpoint file: figures/ next to it
    (tmp_path / "elsewhere").mkdir()
    bare = _model_b_checkpoint(tmp_path / "elsewhere" / "bare.safetensors", config=False)
    assert visualize.main(["--checkpoint", str(bare), "--model", "cifar_model_b", "--image", str(image)]) == 0
    assert {p.name for p in (tmp_path / "elsewhere" / "figures").iterdir()} == names


def test_command_line_refuses_a_missing_checkpoint_or_image_before_writing_anything(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert visualize.main(["--checkpoint", str(run)]) == 2
    assert str(run / "checkpoint.safetensors") in capsys.readouterr().err
    _model_b_checkpoint(run / "checkpoint.safetensors")
    assert visualize.main(["--checkpoint", str(run), "--image", str(tmp_path / "no.png")]) == 2
    assert "no.png" in capsys.readouterr().err
    assert visualize.main(["--checkpoint", str(run), "--image", str(tmp_path / "no.png"),
                           "--out", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint.safetensors", "run"]


@pytest.mark.parametrize("fmt", ["folder", "batches"])
def test_load_cifar10_image_is_load_cifar10s_image_at_that_index_without_a_cache(fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "c10"
    if fmt == "folder":
        write_folder(root, 3)
    else:
        write_batches(root, per_batch=7)
    for split, n in (("test", 30 if fmt == "folder" else 7), ("train", 30 if fmt == "folder" else 35)):
        for k in (0, 1, n // 2 + 1, n - 1, -1, -n):
            assert torch.equal(cifar10.load_cifar10_image(root, k, split),
                               cifar10.load_cifar10(root, split, cache=False, progress=False).images[k])
        with pytest.raises(IndexError, match=rf"load_cifar10_image: expected an index in \[-{n}, {n}\)"):
            cifar10.load_cifar10_image(root, n, split)
        with pytest.raises(IndexError):
            cifar10.load_cifar10_image(root, -n - 1, split)
    assert not (tmp_path / "cache").exists()


def test_command_line_decodes_only_the_cifar10_image_it_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PURENN_CACHE", str(tmp_path / "cache"))
    truth = write_folder(tmp_path / "c10", 2)["test"][0]                  # 20 test images
    decoded = []
    decode = cifar10._decode_chunk
    monkeypatch.setattr(cifar10, "_decode_chunk", lambda paths: decoded.extend(paths) or decode(paths))
    monkeypatch.setattr(cifar10, "load_cifar10", lambda *a, **k: pytest.fail("decodes the split"))
    run = tmp_path / "run"
    run.mkdir()
    _model_b_checkpoint(run / "checkpoint.safetensors")
    assert visualize.main(["--checkpoint", str(run), "--data-dir", str(tmp_path / "c10"),
                           "--cifar-index", "13"]) == 0
    assert decoded == [str(tmp_path / "c10" / "test" / "frog" / "0001.png")]
    shown = truth[13].permute(1, 2, 0).numpy().repeat(4, 0).repeat(4, 1)
    assert np.array_equal(_png_pixels(run / "figures" / "input.png"), shown)
    assert not (tmp_path / "cache").exists()
    assert visualize.main(["--checkpoint", str(run), "--data-dir", str(tmp_path / "c10"),
                           "--cifar-index", "20"]) == 2
    assert "expected an index in [-20, 20)" in capsys.readouterr().err


def test_a_torchvision_pth_holding_nan_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    weights = {"features.0.weight": torch.full((2, 3, 3, 3), float("nan")), "classifier.6.weight": torch.zeros(10, 4)}
    monkeypatch.setattr(nets, "load_torchvision_weights", lambda path: (weights, {}))
    (tmp_path / "vgg16.pth").write_bytes(b"stands in for the weights")
    assert visualize.main(["--checkpoint", str(tmp_path / "vgg16.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "features.0.weight" in err and "NaN" in err
    assert [p.name for p in tmp_path.iterdir()] == ["vgg16.pth"]
