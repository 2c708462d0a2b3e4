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
``tile = side * scale`` (:func:`grid_size`); the histogram figure is exactly
``figsize * dpi`` pixels.

    python -m experiments.visualize --checkpoint runs/x/checkpoint.safetensors --image cat.png \
        --out docs/figures
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import nets

from ..train.runs import check_finite
from ..transfer import feature_cache as fc

__all__ = ["grid_size", "tile_grid", "first_layer_filters", "last_conv_filters",
           "weight_histograms", "feature_maps", "feature_map_grid", "conv_weights",
           "load_checkpoint", "save_png"]


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


def last_conv_filters(weight: torch.Tensor, *, max_out: int = 16, max_in: int = 16,
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
    names = fc.leaf_names(net)
    order = sorted(layers, key=lambda n: names.index(n) if n in names else -1)
    bad = [n for n in layers if n not in names]
    if bad:
        raise ValueError(f"feature_maps: expected leaf layer names of {net.name} (e.g. {names[:4]}), "
                         f"got {bad}")
    outs = fc.block_outputs(net, params, state, image[None], order)
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
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return round(rows * panel[1] * dpi), round(cols * panel[0] * dpi)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, 3)`` uint8 array as a PNG (optimised)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, optimize=True)
    return path


# --------------------------------------------------------------------------------------------
# Checkpoints and the command line


def _num_classes(params) -> int:
    last = [k for k, v in params.items() if k.endswith("weight") and v.dim() == 2]
    return int(params[last[-1]].shape[0]) if last else 10


def load_checkpoint(path: str | Path, model: str | None = None):
    """``(net, params, state, kind)`` of a checkpoint; ``kind`` is ``"imagenet"`` (VGG16 .pth)
    or ``"cifar"`` (our nets; 32x32 images). ``model`` names the net of a ``.safetensors`` file
    when its metadata does not (``cifar_model_a/b/c``, ``cifar_transfer``, ``vgg16``)."""
    path = Path(path)
    if path.suffix == ".pth":
        params, state = nets.load_torchvision_weights(path)
        return nets.vgg16(_num_classes(params), batch_norm=bool(state)), params, state, "imagenet"
    tree, meta = nets.load(path)
    check_finite(tree, f"visualize: {path}")
    params = tree["params"] if isinstance(tree, dict) and "params" in tree else tree
    state = tree.get("state", {}) if isinstance(tree, dict) and "params" in tree else {}
    if model is None and isinstance(meta, dict) and "config" in meta:
        model = json.loads(meta["config"]).get("model")
    k = _num_classes(params)

    builders = {"cifar_model_a": nets.model_a, "cifar_model_b": nets.model_b,
                "cifar_model_c": nets.model_c, "cifar_transfer": nets.small_vgg16}
    if model in builders or model == "vgg16":
        net, kind = ((builders[model](k), "cifar") if model in builders
                     else (nets.vgg16(k, batch_norm=bool(state)), "imagenet"))
        if set(net.layer.param_shapes) != set(params):
            want, got = set(net.layer.param_shapes), set(params)
            raise ValueError(f"visualize: expected the parameters of {net.name} in {path}, got "
                             f"other names (missing {sorted(want - got)[:5]}, unexpected "
                             f"{sorted(got - want)[:5]})")
        return net, params, state, kind
    raise ValueError(f"visualize: expected --model among {sorted(builders) + ['vgg16']} for "
                     f"{path} (its metadata names no model), got {model!r}")


def _image(args, kind) -> tuple[torch.Tensor, np.ndarray]:
    """``(normalised (3, H, W), uint8 (H, W, 3) as shown)`` of the chosen image."""
    from ..data.augment import normalize
    from ..data.caltech256 import imagenet_normalize, load_image

    if args.image:
        size = 224 if kind == "imagenet" else 32
        raw = load_image(args.image, resize=args.resize or (256 if kind == "imagenet" else 32),
                         crop=size)
    else:
        from ..data.cifar10 import find_data_dir, load_cifar10

        test = load_cifar10(find_data_dir(args.data_dir, download=False), "test")
        raw = test.images[args.cifar_index]
    x = imagenet_normalize(raw[None])[0] if kind == "imagenet" else normalize(raw[None])[0]
    return x, raw.permute(1, 2, 0).numpy()
