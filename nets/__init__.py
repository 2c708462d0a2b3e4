"""Models A, B, C and VGG16 as pure ``Net(init, apply)`` pairs over flat parameter dicts.

    net = nets.model_b(num_classes=10)
    params, state = net.init(layers.random.key(0))
    logits, state = net.apply(params, state, x, train=True, key=layers.random.key(1))

``params`` and ``state`` are keyed like the ``state_dict()`` of the equivalent ``torch.nn``
module. Build new nets with :mod:`nets.compose` (``serial`` and the layer records); print their
architecture with :func:`summary`; cut them at a named layer and look layers up by their torch
names with :func:`cut` and :func:`child` (:mod:`nets.cut`); save and load any tree with
:func:`save` / :func:`load` (safetensors); take any layer's activation and its gradient out of
``apply`` with :func:`capture` and :func:`capture_grads` (:mod:`nets.capture`); and move trees
to JAX and back with :func:`to_jax` / :func:`from_jax`.
See docs/nets.md.
"""
from . import compose, whitening
from .airbench import airbench
from .capture import Capture, GradCapture, capture, capture_grads, captured_names
from .checkpoint import load, save
from .compose import Layer, Net, as_net, leaves, serial
from .ensemble import ensemble, stack, unstack
from .cut import block_ends, child, cut, layer_names, leaf_keys, leaf_names, outputs_at
from .jax_interop import from_jax, to_jax
from .jax_torchax import jax_apply
from .model_a import model_a
from .model_b import model_b
from .model_c import model_c
from .small_vgg16 import small_vgg16
from .summary import Row, Summary, summary
from .torchvision_weights import load_torchvision_weights
from .tutorial import tutorial_net
from .vgg16 import vgg16
from .vgg_like import vgg_like

__all__ = [
    "jax_apply", "airbench", "whitening",
    "Capture", "GradCapture", "capture", "capture_grads", "captured_names",
    "Layer", "Net", "Row", "Summary", "as_net", "block_ends", "child", "compose", "cut",
    "from_jax", "layer_names", "leaf_keys", "leaf_names", "leaves", "load",
    "load_torchvision_weights", "outputs_at", "model_a", "model_b", "model_c", "save", "serial", "small_vgg16",
    "summary",
    "to_jax", "vgg16", "vgg_like", "ensemble", "stack", "unstack", "tutorial_net",
]
