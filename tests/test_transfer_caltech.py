"""Caltech-256 transfer code paths on data and weights the tests make: the per-class split on a
generated image-folder tree, VGG preprocessing, the weight resolution (--weights, hub cache,
download, offline error), head training on cached features == head training through the frozen
net (both dropout modes) with frozen parameters bit-identical, and end-to-end runs of both
entry points on a random torchvision-shaped VGG16 at 32x32.

What is tested elsewhere and not repeated here: VGG16's block shapes at 224 (28x28x256 after
block 3, 14x14x512 after block 4) and the weight loader against torchvision, including wrong
and corrupted files, are tests/test_nets_vgg16.py
(test_truncation_after_each_block_halves_the_side_and_follows_the_widths,
test_truncated_vgg16_returns_block_3s_pooled_feature_map_at_224,
test_loader_lists_missing_unexpected_and_misshaped_keys, ...).
"""
import json
import urllib.error

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nets
from experiments import caltech_vgg16_features as cf_cli
from experiments import train as trainer
from experiments import caltech_vgg16_transfer as ct_cli
from experiments.data import caltech256 as cd
from experiments.common.settings import Difference
from experiments.transfer import caltech_blocks as cf
from experiments.transfer import caltech_head as ct
from experiments.transfer import feature_cache as fc
from layers import random as jr
from nets.compose import (AdaptiveAvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU,
                          as_net, serial)

SEEDS = st.integers(0, 2**31 - 1)
COUNTS = {"001.ak47": 45, "002.american-flag": 41, "003.backpack": 40, "257.clutter": 50}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """``256_ObjectCategories`` with three classes, clutter, a greyscale image and a stray file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("caltech")
    base = root / "256_ObjectCategories"
    g = torch.Generator().manual_seed(0)
    for name, count in COUNTS.items():
        (base / name).mkdir(parents=True)
        for i in range(count):
            h, w = 20 + (i % 3) * 4, 24 + (i % 5) * 2
            arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            img = Image.fromarray(arr)
            if i == 0:
                img = img.convert("L")                      # Caltech-256 has greyscale images
            img.save(base / name / f"{name[:3]}_{i:04d}.jpg")
        (base / name / "Thumbs.db").write_bytes(b"not an image")
    (base / "README.txt").write_text("not a class")
    return root


@pytest.fixture(scope="module")
def vgg16_pth(tmp_path_factory):
    """A random VGG16 state dict with torchvision's keys and shapes (conv weights
    N(0, 2 / fan_in), linear N(0, 0.01)), saved with torch.save as torchvision does."""
    import torchvision

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, s in shapes.items():
        std = (2.0 / (s[1] * s[2] * s[3])) ** 0.5 if len(s) == 4 else 0.01
        sd[k] = torch.randn(s, generator=g) * std if k.endswith("weight") else torch.zeros(s)
    path = tmp_path_factory.mktemp("weights") / ct.VGG16_FILE
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------------------------- the split

def test_classes_are_ordered_by_number_and_clutter_is_excluded_by_default(tree):
    classes = cd.list_classes(tree)
    assert [(c.number, c.name, len(c.files)) for c in classes] == [
        (1, "ak47", 45), (2, "american-flag", 41), (3, "backpack", 40)]
    assert [c.number for c in cd.list_classes(tree, include_clutter=True)] == [1, 2, 3, 257]
    assert cd.list_classes(tree / "256_ObjectCategories") == classes


def test_split_takes_exactly_32_train_and_8_test_images_per_class_without_overlap(tree):
    split = cd.split_per_class(cd.list_classes(tree), seed=0)
    assert split.classes == ("001.ak47", "002.american-flag", "003.backpack")
    assert torch.bincount(split.train_labels).tolist() == [32, 32, 32]
    assert torch.bincount(split.test_labels).tolist() == [8, 8, 8]
    assert not set(split.train_files) & set(split.test_files)
    for files, labels in ((split.train_files, split.train_labels), (split.test_files, split.test_labels)):
        for f, y in zip(files, labels):
            assert f.parent.name == split.classes[y]


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS)
def test_split_is_a_function_of_the_seed_and_of_each_class_alone(tree, seed):
    classes = cd.list_classes(tree)
    a = cd.split_per_class(classes, seed=seed)
    b = cd.split_per_class(cd.list_classes(tree), seed=seed)
    assert a.train_files == b.train_files and a.test_files == b.test_files
    # a class's draw does not depend on which other classes are present
    alone = cd.split_per_class(classes[1:2], seed=seed)
    assert alone.train_files == a.train_files[32:64] and alone.test_files == a.test_files[8:16]
    assert a.train_files != cd.split_per_class(classes, seed=seed + 1).train_files


def test_a_class_with_fewer_than_40_images_is_an_error_naming_it(tree):
    classes = cd.list_classes(tree)
    short = classes[:2] + [classes[2]._replace(files=classes[2].files[:39])]
    with pytest.raises(ValueError, match=r"split_per_class: expected at least 40 images per class "
                                         r"\(32 train \+ 8 test\), got fewer in 003.backpack \(39 images\)"):
        cd.split_per_class(short)
    with pytest.raises(ValueError, match="expected train_per_class to be a positive int"):
        cd.split_per_class(classes, train_per_class=0)


def test_a_folder_without_class_folders_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected .* to hold class folders named NNN.name"):
        cd.list_classes(tmp_path)


def test_preprocessing_is_torchvisions_resize_256_centre_crop_224_and_imagenet_normalisation(tree):
    from PIL import Image
    from torchvision import transforms as T

    f = cd.list_classes(tree)[0].files[0]                     # a greyscale file
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(cd.IMAGENET_MEAN, cd.IMAGENET_STD)])(Image.open(f).convert("RGB"))
    x = next(cd.image_batches([f], 1))
    assert x.shape == (1, 3, 224, 224)
    # ToTensor divides by 255 in float32 like normalize does: same numbers up to rounding
    torch.testing.assert_close(x[0], ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- weight resolution

def test_weights_flag_wins_and_a_missing_file_is_a_clear_error(tmp_path):
    given_file = tmp_path / "mine.pth"
    given_file.write_bytes(b"x")
    assert ct.resolve_weights(given_file, hub_dir=tmp_path / "hub") == given_file
    with pytest.raises(ct.WeightsNotFoundError, match=r"--weights .*nope.pth .* no such file"):
        ct.resolve_weights(tmp_path / "nope.pth")


def test_hub_cache_is_used_before_any_download(tmp_path):
    cached_file = tmp_path / "checkpoints" / ct.VGG16_FILE
    cached_file.parent.mkdir()
    cached_file.write_bytes(b"x")

    def no_download(url, dst):
        raise AssertionError("downloaded although the hub cache holds the file")
    assert ct.resolve_weights(hub_dir=tmp_path, downloader=no_download) == cached_file


def test_download_goes_into_the_hub_cache(tmp_path):
    calls = []

    def fake(url, dst):
        calls.append(url)
        open(dst, "wb").write(b"weights")
    got = ct.resolve_weights(hub_dir=tmp_path, downloader=fake)
    assert calls == [ct.VGG16_URL] and got == tmp_path / "checkpoints" / ct.VGG16_FILE


@pytest.mark.parametrize("download", [True, False], ids=["download-fails", "offline"])
def test_no_weights_anywhere_is_an_error_naming_every_place_tried(tmp_path, download):
    def offline(url, dst):
        raise urllib.error.URLError("no network")
    with pytest.raises(ct.WeightsNotFoundError) as err:
        ct.resolve_weights(hub_dir=tmp_path, download=download, downloader=offline)
    msg = str(err.value)
    assert "--weights (not given)" in msg and str(tmp_path / "checkpoints" / ct.VGG16_FILE) in msg
    assert ("no network" in msg) if download else ("not attempted" in msg)


# ------------------------------------------------------------------- head training equivalence

def vgg_shaped(dropout):
    """VGG16's layer names and kinds (features, avgpool, flatten, classifier.0..6) at toy size."""
    return as_net(serial(
        features=serial(Conv2d(3, 4, 3, padding=1), ReLU(), MaxPool2d(2),
                        Conv2d(4, 8, 3, padding=1), ReLU(), MaxPool2d(2)),
        avgpool=AdaptiveAvgPool2d(2), flatten=Flatten(),
        classifier=serial(Linear(32, 16), ReLU(), Dropout(dropout), Linear(16, 16), ReLU(),
                          Dropout(dropout), Linear(16, 5))), name="vgg_shaped")


@settings(deadline=None, max_examples=4)
@given(seed=SEEDS, dropout=st.sampled_from(["eval", "train"]), momentum=st.sampled_from([0.0, 0.9]))
def test_head_trained_on_cached_features_equals_head_trained_through_the_frozen_net(seed, dropout, momentum):
    # "train": cache after classifier.1 and replay both dropouts == the net in train mode.
    # "eval": cache after classifier.4 (dropout off) == the same net with dropout p = 0.
    net = vgg_shaped(0.5)
    reference = net if dropout == "train" else vgg_shaped(0.0)
    params, state = net.init(jr.key(seed), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (10,), generator=g)
    key = jr.key(seed + 1)
    feats = fc.prefix_apply(net, ct.CUT[dropout])(params, state, x)
    _, head, _ = ct.train_head_on_features(net, params, feats, y, dropout=dropout, epochs=3,
                                           batch_size=4, lr=0.05, momentum=momentum, key=key)
    res = trainer.fit_tensors(reference, ct.frozen_optimizer(0.05, momentum), x, y,
                              params=params, state=state, epochs=3, batch_size=4, key=key)
    through, opt_state = res.params, res.opt_state
    for k in ct.HEAD:
        assert not torch.equal(head[k], params[k])                        # it did train
        # float64; the prefix ran on 10 images at once in the cache, 4 at a time through the
        # net: conv/linear reductions of <= 288 terms may round differently (~1e-16 relative)
        torch.testing.assert_close(head[k], through[k], rtol=1e-12, atol=1e-14)
    frozen = [k for k in params if k not in ct.HEAD]
    assert all(torch.equal(through[k], params[k]) for k in frozen)       # bit-identical
    # and the optimizer kept no state at all for them
    momentum_state = [leaf for leaf in torch.utils._pytree.tree_leaves(opt_state)
                      if isinstance(leaf, torch.Tensor) and leaf.dim() > 0]
    assert sum(t.numel() for t in momentum_state) == (
        sum(params[k].numel() for k in ct.HEAD) if momentum else 0)


def test_frozen_mask_freezes_everything_but_the_new_last_layer():
    params, _ = vgg_shaped(0.5).init(jr.key(0))
    mask = ct.frozen_mask(params)
    assert [k for k, frozen in mask.items() if not frozen] == list(ct.HEAD)


# ------------------------------------------------------------------------------- end to end

def test_transfer_entry_point_trains_reports_and_reuses_its_feature_cache(tree, vgg16_pth, tmp_path, capsys):
    argv = ["--data", str(tree), "--weights", str(vgg16_pth), "--train-per-class", "4",
            "--test-per-class", "2", "--resize", "36", "--crop", "32", "--epochs", "2",
            "--batch-size", "4", "--feature-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert ct_cli.main(argv) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert first["classes"] == 3 and first["train_images"] == 12 and first["test_images"] == 6
    assert 0 <= first["test_accuracy"] <= 1 and 0 <= first["test_mean_recall"] <= 1
    assert len(first["history"]) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 2            # train and test features
    capsys.readouterr()
    assert ct_cli.main(argv) == 0
    assert capsys.readouterr().err.count("feature cache: read") == 2
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["test_accuracy"] == first["test_accuracy"] and again["history"] == first["history"]
    head, _ = nets.load(tmp_path / "out" / "head.safetensors")
    assert head["classifier.6.weight"].shape == (3, 4096)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_transfer_rerun_with_other_settings_is_refused_in_one_line_and_the_folder_untouched(
        tree, vgg16_pth, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--data", str(tree), "--weights", str(vgg16_pth), "--train-per-class", "4",
            "--test-per-class", "2", "--resize", "36", "--crop", "32", "--epochs", "1",
            "--batch-size", "4", "--no-cache", "--out", str(out)]
    assert ct_cli.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    before = _snapshot(out)
    capsys.readouterr()
    assert ct_cli.main(argv + ["--epochs", "2", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    named = f"{Difference('epochs', 1, 2)}; {Difference('lr', 0.001, 0.01)}"
    assert f"holds results computed with other settings: {named}" in err[0]
    assert _snapshot(out) == before
    # where the cache and the data are is no setting of the results
    assert ct_cli.main(argv + ["--feature-cache", str(tmp_path / "c2")]) == 0
    # a folder of an older purenn (results, no config): refused, left as it was
    (out / "config.json").unlink()
    before = _snapshot(out)
    assert ct_cli.main(argv) == 2
    assert "did not record the settings" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_features_rerun_with_other_settings_is_refused_and_a_bad_value_is_one_line(
        tree, vgg16_pth, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--data", str(tree), "--weights", str(vgg16_pth), "--train-per-class", "4",
            "--test-per-class", "2", "--resize", "36", "--crop", "32", "--epochs", "1",
            "--hidden", "8", "--no-probes", "--batch-size", "4", "--no-cache", "--out", str(out)]
    assert cf_cli.main(argv) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert cf_cli.main(argv + ["--heads", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(Difference("heads", (3, 4), (3,))) in err[0]
    assert _snapshot(out) == before
    assert cf_cli.main(argv[:-2] + ["--probe-lr", "inf"]) == 2
    assert "--probe-lr: expected a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupted_weights_file_is_one_error_line_naming_it(tree, vgg16_pth, tmp_path, capsys, damage):
    bad = tmp_path / "vgg16.pth"
    bad.write_bytes(b"not a checkpoint" if damage == "garbage" else vgg16_pth.read_bytes()[:4096])
    assert ct_cli.main(["--data", str(tree), "--weights", str(bad), "--no-cache"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(bad) in last


def test_features_entry_point_trains_the_report_heads_and_the_probes(tree, vgg16_pth, tmp_path):
    out = tmp_path / "out"
    argv = ["--data", str(tree), "--weights", str(vgg16_pth), "--train-per-class", "4",
            "--test-per-class", "2", "--resize", "36", "--crop", "32", "--epochs", "1",
            "--hidden", "8", "--probe-epochs", "2", "--batch-size", "4", "--no-cache", "--out", str(out)]
    assert cf_cli.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert sorted(rows) == ["head-block3", "head-block4"] + [f"probe-block{k}" for k in range(1, 6)]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())
    assert (out / "probes.png").stat().st_size > 0


def test_block_features_have_the_documented_sizes_at_32():
    net = nets.vgg16(truncate_after_block=5)
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g) * 0.05 for k, s in net.layer.param_shapes.items()}
    f = cf.block_features(net, params, {}, torch.randn(2, 3, 32, 32, generator=g), (3, 4), torch.float16)
    assert {k: tuple(v.shape) for k, v in f.items()} == {
        "pooled1": (2, 64), "pooled2": (2, 128), "pooled3": (2, 256), "pooled4": (2, 512),
        "pooled5": (2, 512), "block3": (2, 256 * 4 * 4), "block4": (2, 512 * 2 * 2)}
    assert f["block3"].dtype == torch.float16 and f["pooled3"].dtype == torch.float32


def test_visualize_command_line_on_a_torchvision_vgg16_pth(tree, vgg16_pth, tmp_path):
    from PIL import Image

    from experiments import visualize
    from experiments.report import filters as vz

    image = cd.list_classes(tree)[0].files[1]
    out = tmp_path / "figs"
    assert visualize.main(["--checkpoint", str(vgg16_pth), "--image", str(image), "--out", str(out),
                    "--layers", "features.1", "--max-channels", "4"]) == 0
    sizes = {p.name: Image.open(p).size[::-1] for p in out.iterdir()}
    assert sizes == {
        "first_layer_filters.png": vz.titled_size(vz.grid_size(64, (24, 24), 8)),
        "last_conv_filters.png": vz.titled_size(vz.grid_size(256, (24, 24), 16)),
        "weight_histograms.png": (4 * 220, 4 * 300),          # 13 convs + 3 linears, 4 per row
        "input.png": (224, 224),
        "feature_maps_features_1.png": vz.grid_size(4, (224, 224), 2),
    }
    titles = {name: Image.open(out / name).text.get("Title")
              for name in ("first_layer_filters.png", "last_conv_filters.png")}
    assert titles == {"first_layer_filters.png": "features.0.weight (64, 3, 3, 3)",
                      "last_conv_filters.png": "features.28.weight (512, 512, 3, 3): first 16 "
                                               "filters x 16 input channels"}


@pytest.mark.parametrize("module", [ct_cli, cf_cli])
def test_help_describes_the_entry_point(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--data" in out and "--weights" in out and "docs/transfer.md" in out
