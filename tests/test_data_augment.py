"""Batch augmentation: shapes, exact mirrors, crops that are slices of the padded image, keys."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.data import augment as A
from experiments.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from layers import random as jr


def _batch(seed, n=6, c=3, h=8, w=10, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g).to(dtype)


SEEDS = st.integers(0, 2**31 - 1)


@settings(deadline=None, max_examples=30)
@given(seed=SEEDS, pad=st.integers(0, 5), n=st.integers(1, 9))
def test_crop_equals_a_slice_of_the_padded_image_within_bounds(seed, pad, n):
    x = _batch(seed, n=n)
    key = jr.key(seed)
    y = A.random_crop(key, x, pad)
    assert y.shape == x.shape and y.dtype == x.dtype
    if pad == 0:
        assert torch.equal(y, x)
        return
    off = A.crop_offsets(key, n, pad)
    assert ((off >= 0) & (off <= 2 * pad)).all()
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(n):
        dy, dx = off[i].tolist()
        assert torch.equal(y[i], padded[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]])


def test_crop_offsets_cover_every_position():
    off = A.crop_offsets(jr.key(3), 4000, 4)
    for j in range(2):
        assert torch.bincount(off[:, j], minlength=9).min() > 300  # ~444 expected per value


@settings(deadline=None, max_examples=30)
@given(seed=SEEDS, n=st.integers(1, 9))
def test_flip_is_an_exact_mirror_of_the_chosen_images(seed, n):
    x = _batch(seed, n=n)
    key = jr.key(seed)
    y = A.random_flip(key, x)
    mask = A.flip_mask(key, n)
    for i in range(n):
        assert torch.equal(y[i], x[i].flip(-1) if mask[i] else x[i])


def test_flip_mirrors_about_half():
    mask = A.flip_mask(jr.key(0), 10000)
    assert 4800 < int(mask.sum()) < 5200  # 4 standard deviations of Binomial(10000, 1/2) = 200


@settings(deadline=None, max_examples=20)
@given(seed=SEEDS)
def test_same_key_same_batch_and_other_key_other_batch(seed):
    x = _batch(seed, n=16, h=32, w=32)
    a = A.augment_batch(jr.key(seed), x)
    b = A.augment_batch(jr.key(seed), x)
    c = A.augment_batch(jr.key(seed ^ 1), x)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@settings(deadline=None, max_examples=20)
@given(seed=SEEDS)
def test_normalize_matches_the_formula(seed):
    x = _batch(seed)
    y = A.normalize(x, dtype=torch.float64)
    m = torch.tensor(CIFAR10_MEAN, dtype=torch.float64)[:, None, None]
    s = torch.tensor(CIFAR10_STD, dtype=torch.float64)[:, None, None]
    # float64 of (k / 255 - m) / s computed two ways: only rounding differs (~1e-16 relative)
    torch.testing.assert_close(y, (x.double() / 255 - m) / s, rtol=1e-14, atol=1e-14)


def test_augment_without_crop_and_flip_is_normalize():
    x = _batch(1)
    assert torch.equal(A.augment_batch(jr.key(0), x, crop=0, flip=False), A.normalize(x))


def test_padded_pixels_normalise_to_minus_mean_over_std():
    x = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    y = A.augment_batch(jr.key(5), x, crop=4, flip=False)
    floor = (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD))[:, None, None]
    top = (1 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    is_pad = torch.isclose(y, floor.expand_as(y))
    is_img = torch.isclose(y, top[:, None, None].expand_as(y))
    assert (is_pad | is_img).all() and is_pad.any()


def test_augment_of_a_full_batch_keeps_its_shape():
    x = torch.zeros(512, 3, 32, 32, dtype=torch.uint8)
    assert A.augment_batch(jr.key(0), x).shape == (512, 3, 32, 32)


def test_errors_name_the_function_and_what_came():
    with pytest.raises(ValueError, match=r"random_crop: expected a batch \(N, C, H, W\), got \(3, 32, 32\)"):
        A.random_crop(jr.key(0), torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="random_crop: expected padding a non-negative int, got -1"):
        A.random_crop(jr.key(0), torch.zeros(1, 3, 32, 32), -1)
    with pytest.raises(ValueError, match=r"normalize: expected 3 channels.*got \(1, 4, 2, 2\)"):
        A.normalize(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))


@settings(deadline=None, max_examples=30)
@given(seed=SEEDS, size=st.integers(1, 12), n=st.integers(1, 9))
def test_cutout_zeroes_one_clipped_square_per_image_and_nothing_else(seed, size, n):
    x = _batch(seed, n=n, dtype=torch.float32) + 1.0  # no pixel is 0 before the cut
    key = jr.key(seed)
    y = A.random_cutout(key, x, size)
    mask = A.cutout_mask(key, n, x.shape[2], x.shape[3], size)
    assert y.shape == x.shape and mask.shape == (n, 1, x.shape[2], x.shape[3])
    assert torch.equal(y == 0, mask.expand_as(x))
    assert torch.equal(y[~mask.expand_as(x)], x[~mask.expand_as(x)])
    for i in range(n):
        rows = mask[i, 0].any(1).nonzero().flatten()
        cols = mask[i, 0].any(0).nonzero().flatten()
        # one rectangle: contiguous rows and columns, full inside, at most size x size
        assert mask[i, 0].sum() == len(rows) * len(cols)
        assert 1 <= len(rows) <= size and 1 <= len(cols) <= size
        assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1))
        assert torch.equal(cols, torch.arange(cols[0], cols[-1] + 1))
        # clipped only where the square meets the border
        assert len(rows) == size or rows[0] == 0 or rows[-1] == x.shape[2] - 1
        assert len(cols) == size or cols[0] == 0 or cols[-1] == x.shape[3] - 1


def test_cutout_centres_cover_the_image_and_bad_sizes_are_refused():
    mask = A.cutout_mask(jr.key(0), 4000, 8, 10, 1)
    assert mask.sum() == 4000 and mask.any(0).all()  # every pixel is a centre for some image
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="random_cutout: expected size a non-negative int, got"):
            A.random_cutout(jr.key(0), _batch(0, dtype=torch.float32), bad)
    x = _batch(0, dtype=torch.float32)
    assert A.random_cutout(jr.key(0), x, 0) is x


@settings(deadline=None, max_examples=10)
@given(seed=SEEDS)
def test_augment_batch_cuts_out_after_normalising_and_keeps_crop_and_flip_draws(seed):
    x = _batch(seed, h=8, w=8)
    key = jr.key(seed)
    plain = A.augment_batch(key, x)
    cut = A.augment_batch(key, x, cutout=4)
    mask = A.cutout_mask(jr.fold_in(key, 2), x.shape[0], 8, 8, 4).expand_as(plain)
    assert torch.equal(cut[~mask], plain[~mask]) and (cut[mask] == 0).all()
