"""Pictures of a trained net, saved as PNGs: first-layer filters as RGB tiles, last-conv-layer
filters channel by channel, weight histograms per layer, and feature maps of an image.

Works for any checkpoint: our own (``nets.save`` trees, e.g. a run's ``checkpoint.safetensors``
or the transfer study's pretrained net) and torchvision VGG16 state dicts (``.pth``).

Normalisation, so that the pictures are comparable and say what they show:

* **first-layer filters** ``(O, 3, kh, kw)``: each filter is mapped to ``[0, 255]`` by its own
  min and max over all three channels (the usual picture: colour = the RGB pattern the filter
  responds to most), drawn ``scale`` times enlarged, ``ceil(sqrt(O))`` tiles per row;
* **last-conv filters** ``(O, I, kh, kw)``: one row per output filter (the first ``max_out``),
  one tile per input channel (the first ``max_in``), each row scaled by its largest ``|w|`` and
  drawn with a diverging colour map (red positive, blue negative, white 0);
* **weight histograms**: one panel per conv / linear weight, 60 bins, its std in the title;
* **feature maps** ``(C, H, W)`` at chosen layers: the first ``max_channels`` channels, each
  mapped to ``[0, 1]`` by its own min and max, colour map viridis.

Every tile grid is ``rows * (tile + pad) + pad`` by ``cols * (tile + pad) + pad`` pixels with
``tile = side * scale`` (:func:`grid_size`). The two filter pictures are then enlarged again
(nearest neighbour) by the smallest whole factor that makes them at least 512 px wide, under a
white band naming the layer and its weight's shape, e.g. ``features.0.weight (64, 3, 3, 3)``
(:func:`titled`, :func:`titled_size`; the title is also the PNG's ``Title`` text). The
histogram figure is exactly ``figsize * dpi`` pixels.

    python -m experiments.visualize --checkpoint runs/x --image cat.png    # PNGs in runs/x/figures/
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import nets
from nets.checkpoint import atomic_write

from .plots import save_figure

__all__ = ["grid_size", "tile_grid", "first_layer_filters", "last_conv_filters", "titled_size",
           "titled", "filter_title", "filter_figures", "weight_histograms", "feature_maps",
           "feature_map_grid", "conv_weights", "input_image", "save_png"]

#: The filter pictures are at least this many pixels wide (:func:`titled`).
MIN_WIDTH = 512
#: Height in pixels of the white band holding a picture's title (:func:`titled`).
TITLE_BAND = 32
#: The last conv layer shows at most this many filters, and this many input channels of each.
LAST_CONV_SHOWN = 16


def conv_weights(params: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The 4-D (conv) weights of ``params`` in the dict's order (a net's ``init`` order is its
    layer order)."""
    return [(k, v) for k, v in params.items() if k.endswith("weight") and v.dim() == 4]


def grid_size(n: int, tile: tuple[int, int], cols: int, pad: int = 1) -> tuple[int, int]:
    """``(height, width)`` in pixels of a grid of ``n`` tiles of ``tile = (h, w)``, ``cols`` per row."""
    rows = math.ceil(n / cols)
    return rows * (tile[0] + pad) + pad, cols * (tile[1] + pad) + pad


def tile_grid(tiles: np.ndarray, cols: int, *, scale: int = 1, pad: int = 1,
              background: int = 255) -> np.ndarray:
    """``(n, h, w, 3)`` uint8 tiles -> one ``(H, W, 3)`` uint8 image (see :func:`grid_size`),
    each tile enlarged ``scale`` times (nearest neighbour)."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tile_grid: expected uint8 tiles (n, h, w, 3), got {tiles.dtype} {tiles.shape}")
    n, h, w, _ = tiles.shape
    tiles = tiles.repeat(scale, 1).repeat(scale, 2)
    th, tw = h * scale, w * scale
    H, W = grid_size(n, (th, tw), cols, pad)
    out = np.full((H, W, 3), background, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        out[y:y + th, x:x + tw] = tiles[i]
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _colormap(x: torch.Tensor, name: str) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through a matplotlib colour map: ``(...,) -> (..., 3)``."""
    from matplotlib import colormaps

    rgba = colormaps[name](x.clamp(0, 1).numpy())
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def first_layer_filters(weight: torch.Tensor, *, scale: int = 8, pad: int = 1,
                        cols: int | None = None) -> np.ndarray:
    """First-layer filters ``(O, 3, kh, kw)`` as RGB tiles (min-max per filter): ``(H, W, 3)`` uint8."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"first_layer_filters: expected a conv weight (O, 3, kh, kw) over RGB, "
                         f"got {tuple(weight.shape)}")
    w = weight.detach().float().cpu()
    lo = w.amin((1, 2, 3), keepdim=True)
    hi = w.amax((1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    cols = cols or math.ceil(math.sqrt(w.shape[0]))
    return tile_grid(_to_uint8(w.permute(0, 2, 3, 1)), cols, scale=scale, pad=pad)


def last_conv_filters(weight: torch.Tensor, *, max_out: int = LAST_CONV_SHOWN,
                      max_in: int = LAST_CONV_SHOWN,
                      scale: int = 8, pad: int = 1) -> np.ndarray:
    """Conv filters ``(O, I, kh, kw)`` channel by channel: ``min(O, max_out)`` rows of
    ``min(I, max_in)`` tiles, each row scaled by its largest ``|w|``, colour map RdBu_r."""
    if weight.dim() != 4:
        raise ValueError(f"last_conv_filters: expected a conv weight (O, I, kh, kw), got "
                         f"{tuple(weight.shape)}")
    w = weight.detach().float().cpu()[:max_out, :max_in]
    o, i = w.shape[:2]
    w = w / w.abs().amax((1, 2, 3), keepdim=True).clamp_min(1e-12)
    tiles = _colormap((w.reshape(o * i, *w.shape[2:]) + 1) / 2, "RdBu_r")
    return tile_grid(tiles, i, scale=scale, pad=pad)


def titled_size(grid_hw: tuple[int, int], *, min_width: int = MIN_WIDTH,
                band: int = TITLE_BAND) -> tuple[int, int]:
    """``(height, width)`` in pixels of :func:`titled` of an ``(H, W)`` grid:
    ``(band + f * H, f * W)`` with ``f = max(1, ceil(min_width / W))``."""
    h, w = grid_hw
    f = max(1, math.ceil(min_width / w))
    return band + f * h, f * w


def titled(grid: np.ndarray, title: str, *, min_width: int = MIN_WIDTH,
           band: int = TITLE_BAND) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 grid enlarged ``f`` times (nearest neighbour, so a 3x3 filter stays
    nine sharp squares) under a white band of ``band`` pixels holding ``title`` in black,
    centred, its font shrunk until it fits (down to 6 px): ``(band + f * H, f * W, 3)`` uint8
    (:func:`titled_size`)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    grid = np.asarray(grid)
    if grid.ndim != 3 or grid.shape[-1] != 3 or grid.dtype != np.uint8:
        raise ValueError(f"titled: expected a uint8 image (H, W, 3), got {grid.dtype} {grid.shape}")
    height, width = titled_size(grid.shape[:2], min_width=min_width, band=band)
    f = width // grid.shape[1]
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    out[band:] = grid.repeat(f, 0).repeat(f, 1)
    # matplotlib's own copy of DejaVu Sans: the same letters on every machine
    font_file = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    size = max(6, band // 2)
    font = ImageFont.truetype(font_file, size)
    while size > 6 and font.getlength(title) > width - 8:
        size -= 1
        font = ImageFont.truetype(font_file, size)
    canvas = Image.fromarray(out)
    ImageDraw.Draw(canvas).text((width / 2, band / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    return np.asarray(canvas)


def filter_title(name: str, weight: torch.Tensor, shown: tuple[int, int] | None = None) -> str:
    """``"features.0.weight (64, 3, 3, 3)"``; when ``shown = (filters, channels)`` is less than
    the weight's ``(O, I)``, followed by ``": first 16 filters x 16 input channels"``."""
    title = f"{name} {tuple(weight.shape)}"
    if shown is not None and tuple(shown) != tuple(weight.shape[:2]):
        title += f": first {shown[0]} filters x {shown[1]} input channels"
    return title


def filter_figures(params: Mapping[str, torch.Tensor], *,
                   scale: int = 8) -> dict[str, tuple[np.ndarray, str]]:
    """``{"first_layer_filters": (image, title), "last_conv_filters": (image, title)}``: the
    first and the last conv weight of ``params`` (layer order) drawn by
    :func:`first_layer_filters` and :func:`last_conv_filters` at ``scale``, then :func:`titled`
    with :func:`filter_title`."""
    convs = conv_weights(params)
    if not convs:
        raise ValueError(f"filter_figures: expected conv weights (4-D), got none in "
                         f"{list(params)[:5]}")
    (first_name, first), (last_name, last) = convs[0], convs[-1]
    shown = (min(last.shape[0], LAST_CONV_SHOWN), min(last.shape[1], LAST_CONV_SHOWN))
    figures = {"first_layer_filters": (first_layer_filters(first, scale=scale),
                                       filter_title(first_name, first)),
               "last_conv_filters": (last_conv_filters(last, scale=scale),
                                     filter_title(last_name, last, shown))}
    return {what: (titled(grid, title), title) for what, (grid, title) in figures.items()}


def feature_map_grid(fmap: torch.Tensor, *, max_channels: int = 16, scale: int = 2,
                     pad: int = 1, cols: int | None = None) -> np.ndarray:
    """Feature maps ``(C, H, W)`` of one image: the first ``max_channels`` channels, min-max per
    channel, viridis: ``(H', W', 3)`` uint8."""
    if fmap.dim() != 3:
        raise ValueError(f"feature_map_grid: expected one image's feature maps (C, H, W), got "
                         f"{tuple(fmap.shape)}")
    f = fmap.detach().float().cpu()[:max_channels]
    lo, hi = f.amin((1, 2), keepdim=True), f.amax((1, 2), keepdim=True)
    f = (f - lo) / (hi - lo).clamp_min(1e-12)
    cols = cols or math.ceil(math.sqrt(f.shape[0]))
    return tile_grid(_colormap(f, "viridis"), cols, scale=scale, pad=pad)


def feature_maps(net: nets.Net, params, state, image: torch.Tensor,
                 layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{layer: (C, H, W)}``: the eval-mode output of each leaf layer in ``layers`` for one
    normalised image ``(3, H, W)`` (one forward pass, cut at each)."""
    if image.dim() != 3:
        raise ValueError(f"feature_maps: expected one image (3, H, W), got {tuple(image.shape)}")
    names = nets.leaf_names(net)
    order = sorted(layers, key=lambda n: names.index(n) if n in names else -1)
    bad = [n for n in layers if n not in names]
    if bad:
        raise ValueError(f"feature_maps: expected leaf layer names of {net.name} (e.g. {names[:4]}), "
                         f"got {bad}")
    outs = nets.outputs_at(net, params, state, image[None], order)
    return {n: o[0] for n, o in zip(order, outs)}


def weight_histograms(params: Mapping[str, torch.Tensor], path: str | Path, *, cols: int = 4,
                      panel: tuple[float, float] = (3.0, 2.2), dpi: int = 100,
                      title: str = "") -> tuple[int, int]:
    """One histogram per conv / linear weight (2-D or 4-D) in the dict's order, saved at ``path``;
    returns the PNG's
    ``(height, width)`` = ``(rows * panel[1] * dpi, cols * panel[0] * dpi)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [(k, v) for k, v in params.items() if k.endswith("weight") and v.dim() in (2, 4)]
    if not ws:
        raise ValueError("weight_histograms: expected conv or linear weights, got none")
    cols = min(cols, len(ws))
    rows = math.ceil(len(ws) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel[0], rows * panel[1]), dpi=dpi,
                             squeeze=False)
    for ax, (name, w) in zip(axes.flat, ws):
        v = w.detach().float().flatten().cpu().numpy()
        ax.hist(v, bins=60, color="tab:blue")
        ax.set_title(f"{name} {tuple(w.shape)}\nstd {v.std():.3g}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(ws):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
    return round(rows * panel[1] * dpi), round(cols * panel[0] * dpi)


def save_png(image: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """Write an ``(H, W, 3)`` uint8 array as a PNG (optimised); a ``title`` is stored as the
    PNG's ``Title`` text (what the picture shows, for a viewer or a test to read)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if title:
        info.add_text("Title", title)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=True, pnginfo=info)
    atomic_write(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------
# The input image (the net comes from the run loader, :mod:`experiments.catalog`)


def input_image(kind: str, image: str | Path | None = None, *, resize: int | None = None,
                data_dir: str | Path | None = None,
                cifar_index: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``(normalised (3, H, W), uint8 (H, W, 3) as shown)``: the file ``image``, its shorter
    side resized to ``resize`` (default 256 for ``kind="imagenet"``, else 32) and centre-cropped
    to 224 or 32; without ``image``, CIFAR-10 test image ``cifar_index`` of ``data_dir`` (only
    that image is decoded: :func:`experiments.data.cifar10.load_cifar10_image`)."""
    from ..data.augment import normalize
    from ..data.caltech256 import imagenet_normalize, load_image

    if image:
        size = 224 if kind == "imagenet" else 32
        raw = load_image(image, resize=resize or (256 if kind == "imagenet" else 32), crop=size)
    else:
        from ..data.cifar10 import find_data_dir, load_cifar10_image

        raw = load_cifar10_image(find_data_dir(data_dir, download=False), cifar_index, "test")
    x = imagenet_normalize(raw[None])[0] if kind == "imagenet" else normalize(raw[None])[0]
    return x, raw.permute(1, 2, 0).numpy()
