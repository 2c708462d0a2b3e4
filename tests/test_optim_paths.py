"""One tree-path convention: optim (errors, masks, path-keyed sub-trees) and nets (checkpoints)
name every leaf by the same "/"-joined path (``trees.paths``)."""
import pytest
import safetensors
import torch

import nets
import optim
import trees


def nested_params():
    g = torch.Generator().manual_seed(0)
    return {"features.0.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
            "features.0.bias": torch.randn(2, generator=g, dtype=torch.float64),
            "head": [{"w": torch.randn(3, generator=g, dtype=torch.float64)}]}


def test_optim_and_nets_give_every_leaf_of_params_and_optimizer_state_the_same_path():
    params = nested_params()
    tree = {"params": params, "opt_state": optim.adamw(1e-3, amsgrad=True).init(params)}
    walked = [path for path, _ in trees.leaves_with_paths(tree, "test")]
    assert trees.leaf_paths(tree) == walked
    assert "opt_state/0/mu/head/0/w" in walked and "params/features.0.bias" in walked


def test_the_path_in_an_optim_error_is_the_key_a_checkpoint_stores_the_leaf_under(tmp_path):
    params = nested_params()
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    nets.save(tmp_path / "state.safetensors", state)
    with safetensors.safe_open(tmp_path / "state.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "0/mu/head/0/w" in stored
    state[0].mu["head"][0]["w"].requires_grad_(True)
    with pytest.raises(ValueError, match=r"got one in state at '0/mu/head/0/w'"):
        optim.step(opt, params, state, params, donate=True)


def test_masks_match_nested_leaves_by_their_slash_joined_paths():
    params = nested_params()
    frozen = {"features.0.weight": False, "features.0.bias": True, "head": [{"w": False}]}
    opt = optim.freeze(optim.sgd(0.1, momentum=0.9), frozen)
    state = opt.init(params)
    # The inner optimizer sees a flat dict keyed by path: a state_dict key stays as it is.
    assert list(state.inner_states["trainable"][0].momentum_buffer) == ["features.0.weight", "head/0/w"]
    with pytest.raises(ValueError, match=r"freeze: mask and params differ at 'head/0/w': missing in mask"):
        optim.freeze(optim.sgd(0.1), {"features.0.weight": False, "features.0.bias": True,
                                      "head": [{}]}).init(params)
