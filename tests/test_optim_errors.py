"""Errors: every invalid hyperparameter (torch's condition), tree mismatches naming the path."""
import re

import pytest
import torch

import optim


@pytest.mark.parametrize("make, match", [
    (lambda: optim.sgd(-0.1), r"sgd: Invalid learning rate: expected lr >= 0, got -0.1"),
    (lambda: optim.sgd(0.1, momentum=-0.5), r"sgd: Invalid momentum value: expected momentum >= 0, got -0.5"),
    (lambda: optim.sgd(0.1, weight_decay=-1e-4), r"sgd: Invalid weight_decay value: expected weight_decay >= 0, got -0.0001"),
    (lambda: optim.sgd(0.1, nesterov=True), r"sgd: Nesterov momentum requires a momentum and zero dampening: expected momentum > 0 and dampening == 0, got momentum=0.0, dampening=0.0"),
    (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), r"sgd: Nesterov momentum requires .* got momentum=0.9, dampening=0.1"),
    (lambda: optim.adam(-1e-3), r"adam: Invalid learning rate: expected lr >= 0, got -0.001"),
    (lambda: optim.adam(float("nan")), r"adam: Invalid learning rate: expected lr >= 0, got nan"),
    (lambda: optim.adam(eps=-1e-8), r"adam: Invalid epsilon value: expected eps >= 0, got -1e-08"),
    (lambda: optim.adam(betas=(1.0, 0.999)), r"adam: Invalid beta parameter at index 0: expected 0 <= betas\[0\] < 1, got 1.0"),
    (lambda: optim.adam(betas=(-0.1, 0.999)), r"adam: Invalid beta parameter at index 0: expected 0 <= betas\[0\] < 1, got -0.1"),
    (lambda: optim.adam(betas=(0.9, 1.0)), r"adam: Invalid beta parameter at index 1: expected 0 <= betas\[1\] < 1, got 1.0"),
    (lambda: optim.adam(weight_decay=-0.1), r"adam: Invalid weight_decay value: expected weight_decay >= 0, got -0.1"),
    (lambda: optim.adamw(-1.0), r"adamw: Invalid learning rate: expected lr >= 0, got -1.0"),
    (lambda: optim.adamw(eps=-1.0), r"adamw: Invalid epsilon value: expected eps >= 0, got -1.0"),
    (lambda: optim.adamw(betas=(0.9, 1.5)), r"adamw: Invalid beta parameter at index 1: expected 0 <= betas\[1\] < 1, got 1.5"),
    (lambda: optim.adamw(weight_decay=-0.01), r"adamw: Invalid weight_decay value: expected weight_decay >= 0, got -0.01"),
])
def test_invalid_hyperparameter_raises_value_error_like_torch(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("ours, theirs", [
    (lambda: optim.sgd(-0.1), lambda p: torch.optim.SGD(p, lr=-0.1)),
    (lambda: optim.sgd(0.1, momentum=-1.0), lambda p: torch.optim.SGD(p, lr=0.1, momentum=-1.0)),
    (lambda: optim.sgd(0.1, momentum=0.5, dampening=0.5, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5, nesterov=True)),
    (lambda: optim.adam(eps=-1.0), lambda p: torch.optim.Adam(p, eps=-1.0)),
    (lambda: optim.adamw(betas=(0.5, 1.0)), lambda p: torch.optim.AdamW(p, betas=(0.5, 1.0))),
])
def test_torch_rejects_the_same_hyperparameters(ours, theirs):
    with pytest.raises(ValueError):
        ours()
    with pytest.raises(ValueError):
        theirs([torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.parametrize("make", [
    lambda: optim.sgd(0.1, momentum=1.5),             # torch allows momentum >= 1
    lambda: optim.sgd(0.1, momentum=0.9, dampening=2.0),
    lambda: optim.sgd(0.0),
    lambda: optim.adam(0.0, betas=(0.0, 0.0), eps=0.0),
])
def test_hyperparameters_torch_accepts_are_accepted(make):
    make()


@pytest.mark.parametrize("make, match", [
    (lambda: optim.sgd("0.1"), r"sgd: expected lr \(a float or a schedule step -> lr\) to be a real number, got str"),
    (lambda: optim.sgd(0.1, nesterov=1), r"sgd: expected nesterov to be a bool, got int"),
    (lambda: optim.adam(betas=0.9), r"adam: expected betas to be a pair \(beta1, beta2\), got 0.9"),
    (lambda: optim.adamw(amsgrad="yes"), r"adamw: expected amsgrad to be a bool, got str"),
    (lambda: optim.chain(optim.negate(), "sgd"), r"chain: expected GradientTransformations, got str at position 1"),
    (lambda: optim.step("sgd", {}, (), {}), r"step: expected a GradientTransformation, got str"),
])
def test_wrong_types_raise_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def params():
    return {"features.0.weight": torch.zeros(2, 3), "features.0.bias": torch.zeros(2)}


def test_grads_missing_a_leaf_names_its_path():
    opt = optim.sgd(0.1, momentum=0.9)
    p = params()
    grads = {"features.0.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"grads and params differ at 'features.0.bias': missing in grads"):
        optim.step(opt, grads, opt.init(p), p)
    with pytest.raises(ValueError, match=r"update: grads and params differ at 'features.0.bias': missing in grads"):
        opt.update(grads, opt.init(p), p)


def test_grads_with_an_extra_leaf_names_its_path():
    p = params()
    grads = {**params(), "classifier.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"apply_updates: updates and params differ at 'classifier.weight': unexpected in updates"):
        optim.apply_updates(p, grads)


def test_nested_tree_mismatch_names_the_nested_path():
    p = {"features": [torch.zeros(2), {"bias": torch.zeros(2)}]}
    g = {"features": [torch.zeros(2), {"weight": torch.zeros(2)}]}
    with pytest.raises(ValueError, match=r"step: grads and params differ at 'features/1/bias': missing in grads"):
        optim.step(optim.adam(), g, optim.adam().init(p), p)


def test_shape_or_dtype_mismatch_names_the_leaf():
    p = params()
    g = {**params(), "features.0.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"step: grads and params differ at 'features.0.bias': expected \(2,\) torch.float32 as in params, got \(3,\) torch.float32"):
        optim.step(optim.sgd(0.1), g, optim.sgd(0.1).init(p), p)
    g = {**params(), "features.0.bias": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"got \(2,\) torch.float64"):
        optim.step(optim.sgd(0.1), g, optim.sgd(0.1).init(p), p)


def test_mask_missing_a_leaf_names_its_path():
    p = params()
    opt = optim.sgd(0.1, weight_decay=0.1, weight_decay_mask={"features.0.weight": True})
    with pytest.raises(ValueError, match=r"mask and params differ at 'features.0.bias': missing in mask"):
        opt.init(p)


def test_mask_with_non_bool_leaves_raises_type_error():
    p = params()
    opt = optim.freeze(optim.sgd(0.1), {"features.0.weight": 1, "features.0.bias": 0})
    with pytest.raises(TypeError, match=r"freeze: expected mask leaves to be bools, got int at 'features.0.weight'"):
        opt.init(p)


def test_unknown_label_in_multi_transform_is_an_error():
    p = params()
    opt = optim.multi_transform({"a": optim.sgd(0.1)}, {"features.0.weight": "a", "features.0.bias": "b"})
    with pytest.raises(ValueError, match=r"multi_transform.init: expected a label in \['a'\] at 'features.0.bias', got 'b'"):
        opt.init(p)


def test_state_from_other_params_is_an_error():
    opt = optim.adam()
    with pytest.raises(ValueError, match=r"scale_by_adam.update: expected moments for 2 leaves, got 1"):
        opt.update(params(), opt.init({"w": torch.zeros(2)}), params())


def test_non_tensor_gradient_leaf_raises_type_error():
    p = params()
    g = {**params(), "features.0.bias": 0.0}
    with pytest.raises(TypeError, match=r"step: expected tensor leaves, got float in grads at 'features.0.bias'"):
        optim.step(optim.sgd(0.1), g, optim.sgd(0.1).init(p), p)


def test_current_lr_without_an_lr_field_is_an_error():
    with pytest.raises(ValueError, match=r"current_lr: expected an optimizer state holding an 'lr' field"):
        optim.current_lr(optim.clip_by_global_norm(1.0).init(params()))


@pytest.mark.parametrize("read, message", [
    (optim.current_lr, r"current_lr: expected an optimizer state holding an 'lr' field "
                       r"\(from sgd/adam/adamw/scale_by_learning_rate\), got {}"),
    (optim.current_step, r"current_step: expected an optimizer state holding a 'count' field, got {}"),
])
@pytest.mark.parametrize("state, type_name", [
    (lambda: optim.clip_by_global_norm(1.0).init(params()), "EmptyState"),
    (lambda: {"momentum": 0.9}, "dict"),
])
def test_reading_a_missing_state_field_names_the_reader_the_field_and_the_state_type(read, message, state, type_name):
    # the whole message: the reader, the field with its article ("an 'lr'", "a 'count'"), where
    # such a field comes from, and the type of the state that lacks it
    with pytest.raises(ValueError, match="^" + message.format(type_name) + "$"):
        read(state())


def test_a_structure_mismatch_names_the_path_leaf_against_subtree_and_differing_containers():
    t = torch.zeros(2)
    cases = [
        ({"a": {"x": t}}, {"a": t}, r"at 'a': a leaf in params but a subtree in grads$"),
        ({"a": t}, {"a": {"x": t}}, r"at 'a/x': missing in grads$"),
        ([t, t], (t, t), r"at the root: containers differ \(grads TreeSpec\(list, .*params TreeSpec\(tuple, "),
        ({"a": t, "b": t}, {"b": t, "a": t},
         r"at the root: containers differ \(grads TreeSpec\(dict, \['a', 'b'\].*params TreeSpec\(dict, \['b', 'a'\]"),
    ]
    opt = optim.sgd(0.1)
    for grads, params, match in cases:
        with pytest.raises(ValueError, match=r"(?s)update: grads and params differ " + match):
            opt.update(grads, opt.init(params), params)


@pytest.mark.parametrize("inner, type_name", [(lambda u: u, "function"), ("sgd", "str"), (None, "NoneType")])
def test_masked_refuses_what_is_not_a_gradient_transformation_naming_its_type(inner, type_name):
    with pytest.raises(TypeError, match=rf"^masked: expected a GradientTransformation, got {type_name}$"):
        optim.masked(inner, {"features.0.weight": True, "features.0.bias": False})


def test_a_bad_mask_is_named_by_the_masked_stage_that_resolved_it():
    # init resolves the mask as 'masked.init', update as 'masked.update' (on params when given)
    p = params()
    bad = optim.masked(optim.scale_by_learning_rate(0.5), {"features.0.weight": 1, "features.0.bias": 0})
    with pytest.raises(TypeError, match=r"^masked\.init: expected mask leaves to be bools, got int "
                                        r"at 'features\.0\.weight'$"):
        bad.init(p)
    opt = optim.masked(optim.scale_by_learning_rate(0.5), {"features.0.weight": True, "features.0.bias": False})
    state = opt.init(p)
    wider = {**params(), "classifier.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"^masked\.update: mask and params differ at 'classifier\.weight': "
                                         r"missing in mask$"):
        opt.update(wider, state, wider)


@pytest.mark.parametrize("mask", [None, {"features.0.weight": True, "features.0.bias": False}])
def test_add_decayed_weights_without_params_names_itself_and_what_it_needs(mask):
    opt = optim.add_decayed_weights(0.1, mask)
    p = params()
    state = opt.init(p)
    with pytest.raises(ValueError, match=r"^add_decayed_weights\.update: expected params \(weight decay "
                                         r"needs them\), got None$"):
        opt.update(params(), state)


def test_a_stage_names_itself_and_both_trees_where_updates_and_params_differ():
    p = {"a": torch.ones(2), "b": torch.ones(3)}
    missing, wrong = {"a": torch.ones(2)}, {"a": torch.ones(2), "b": torch.ones(4)}
    at_b = {id(missing): "missing in updates",
            id(wrong): "expected (3,) torch.float32 as in params, got (4,) torch.float32"}
    decay, zero = optim.add_decayed_weights(0.1), optim.set_to_zero()
    for bad in (missing, wrong):
        tail = re.escape(f"updates and params differ at 'b': {at_b[id(bad)]}") + "$"
        with pytest.raises(ValueError, match=r"^add_decayed_weights\.update: " + tail):
            decay.update(bad, decay.init(p), p)
        # optim.step checks its grads first; a stage's own fused step names itself
        with pytest.raises(ValueError, match=r"^set_to_zero\.step: " + tail):
            zero.fused_step(bad, zero.init(p), p)


@pytest.mark.parametrize("inner, type_name", [(lambda u: u, "function"), ("sgd", "str"), (None, "NoneType")])
def test_multi_transform_refuses_what_is_not_a_gradient_transformation_naming_label_and_type(inner, type_name):
    with pytest.raises(TypeError, match=rf"^multi_transform: expected a GradientTransformation for "
                                        rf"label 'b', got {type_name}$"):
        optim.multi_transform({"a": optim.sgd(0.1), "b": inner},
                              {"features.0.weight": "a", "features.0.bias": "b"})


def test_bad_labels_are_named_by_the_multi_transform_stage_that_resolved_them():
    # init resolves the labels as 'multi_transform.init', update / fused step as
    # 'multi_transform.update' / '.step' (on params when given); the tree is called 'labels'
    p = params()
    transforms = {"a": optim.scale_by_learning_rate(0.5), "b": optim.sgd(0.1)}
    short = optim.multi_transform(transforms, {"features.0.weight": "a"})
    with pytest.raises(ValueError, match=r"^multi_transform\.init: labels and params differ at "
                                         r"'features\.0\.bias': missing in labels$"):
        short.init(p)
    opt = optim.multi_transform(transforms, {"features.0.weight": "a", "features.0.bias": "b"})
    state = opt.init(p)
    wider = {**params(), "classifier.weight": torch.zeros(1)}
    for stage, call in (("update", opt.update), ("step", opt.fused_step)):
        with pytest.raises(ValueError, match=rf"^multi_transform\.{stage}: labels and params differ at "
                                             r"'classifier\.weight': missing in labels$"):
            call(wider, state, wider)
    # a callable's labels are checked against the transforms at every resolution
    by_name = optim.multi_transform(transforms, lambda t: {k: "c" if k.startswith("classifier") else "a"
                                                           for k in t})
    state = by_name.init(p)
    for stage, call in (("update", by_name.update), ("step", by_name.fused_step)):
        with pytest.raises(ValueError, match=rf"^multi_transform\.{stage}: expected a label in "
                                             r"\['a', 'b'\] at 'classifier\.weight', got 'c'$"):
            call(wider, state, wider)


def test_multi_transform_fused_step_names_itself_and_both_trees_where_updates_and_params_differ():
    p = {"a": torch.ones(2), "b": torch.ones(3)}
    missing, wrong = {"a": torch.ones(2)}, {"a": torch.ones(2), "b": torch.ones(4)}
    opt = optim.multi_transform({"x": optim.scale_by_learning_rate(0.1), "y": optim.set_to_zero()},
                                {"a": "x", "b": "y"})
    for bad, at_b in ((missing, "missing in updates"),
                      (wrong, "expected (3,) torch.float32 as in params, got (4,) torch.float32")):
        with pytest.raises(ValueError, match=r"^multi_transform\.step: " + re.escape(
                f"updates and params differ at 'b': {at_b}") + "$"):
            opt.fused_step(bad, opt.init(p), p)


def test_set_to_zero_names_itself_and_the_updates_where_a_leaf_is_not_a_tensor():
    zero = optim.set_to_zero()
    with pytest.raises(TypeError, match=r"^set_to_zero\.update: expected tensor leaves, got int in "
                                        r"updates at 'b'$"):
        zero.update({"a": torch.ones(2), "b": 3}, zero.init({}))


def test_every_stage_names_itself_the_tree_and_the_path_of_a_leaf_that_is_not_a_tensor():
    p = {"a": torch.ones(2), "b": torch.ones(3)}
    bad = {"a": torch.ones(2), "b": 1.0}
    cases = []
    for name, make in (("trace", lambda: optim.trace(0.9)), ("negate", optim.negate),
                       ("scale_by_learning_rate", lambda: optim.scale_by_learning_rate(0.1)),
                       ("scale_by_adam", lambda: optim.scale_by_adam(amsgrad=True)),
                       ("clip_by_global_norm", lambda: optim.clip_by_global_norm(1.0))):
        stage = make()
        state = stage.init(p)
        cases.append((lambda stage=stage, state=state: stage.update(bad, state, p), f"{name}.update", "updates"))
        if name in ("trace", "scale_by_adam"):   # the stages that keep a buffer per leaf
            cases.append((lambda stage=stage: stage.init(bad), f"{name}.init", "params"))
            for field in ("momentum_buffer",) if name == "trace" else ("mu", "nu", "nu_max"):
                broken = state._replace(**{field: bad})
                cases.append((lambda stage=stage, broken=broken: stage.update(p, broken, p), f"{name}.update",
                              f"state.{field}"))
    for call, where, tree in cases:
        with pytest.raises(TypeError, match="^" + re.escape(f"{where}: expected tensor leaves, got float in {tree} "
                                                            "at 'b'") + "$"):
            call()


def test_a_state_made_for_other_params_is_refused_by_the_stage_that_keeps_it():
    p = {"a": torch.ones(2), "b": torch.ones(3)}
    trace, adam = optim.trace(0.9), optim.scale_by_adam()
    with pytest.raises(ValueError, match=r"^trace\.update: expected a momentum buffer per update leaf \(2\), got 1: "
                                         r"was the state made by init on these params\?$"):
        trace.update(p, trace.init(p)._replace(momentum_buffer={"a": torch.ones(2)}), p)
    for field, counts in (("mu", "1 in state.mu and 2 in state.nu"), ("nu", "2 in state.mu and 1 in state.nu")):
        with pytest.raises(ValueError, match=rf"^scale_by_adam\.update: expected moments for 2 leaves, got {counts}: "
                                             r"was the state made by init on these params\?$"):
            adam.update(p, adam.init(p)._replace(**{field: {"a": torch.ones(2)}}), p)
    with pytest.raises(ValueError, match=r"^scale_by_adam\.update: expected params, got None$"):
        adam.update(p, adam.init(p), None)


def test_mask_leaves_are_python_bools_or_0_d_bool_tensors_and_leaf_paths_must_be_unique():
    t = torch.ones(2)
    params = {"a": t, "b": t}
    stage = optim.masked(optim.negate(), {"a": torch.tensor(True), "b": torch.tensor(False)})
    out = stage.update(params, stage.init(params), params)[0]
    assert torch.equal(out["a"], -t) and torch.equal(out["b"], t)   # as the bools True, False
    # every leaf is checked, also after an accepted tensor one
    for mask, at, got in (({"a": torch.tensor(True), "b": 1}, "b", "int"), ({"a": torch.tensor([True]), "b": True}, "a", "Tensor"),
                          ({"a": torch.tensor(1.0), "b": True}, "a", "Tensor")):
        with pytest.raises(TypeError, match=rf"^masked\.init: expected mask leaves to be bools, got {got} at '{at}'$"):
            optim.masked(optim.negate(), mask).init(params)
    with pytest.raises(ValueError, match=r"^masks: expected unique leaf paths, got 'a/b' twice \(keys containing "
                                         r"'/' collide with nesting\)$"):
        optim.masked(optim.negate(), {"c": True, "a/b": True, "a": {"b": True}}).init({"c": t, "a/b": t, "a": {"b": t}})


def test_sgd_and_the_learning_rate_stage_name_each_bad_hyperparameter_whole():
    for name, kind in (("momentum", "a real number"), ("dampening", "a real number"),
                       ("weight_decay", "a real number"), ("nesterov", "a bool"), ("maximize", "a bool")):
        bad = "0.5" if kind == "a real number" else 1
        got = "str" if kind == "a real number" else "int"
        with pytest.raises(TypeError, match=rf"^sgd: expected {name} to be {kind}, got {got}$"):
            optim.sgd(0.1, **{name: bad})
    with pytest.raises(TypeError, match=r"^scale_by_learning_rate: expected lr \(a float or a schedule step -> lr\) "
                                        r"to be a real number, got str$"):
        optim.scale_by_learning_rate("0.1")
    p = {"a": torch.ones(2), "b": torch.ones(3)}
    stage = optim.scale_by_learning_rate(0.1)
    with pytest.raises(ValueError, match=r"^scale_by_learning_rate\.step: updates and params differ at 'b': "
                                         r"missing in updates$"):
        stage.fused_step({"a": torch.ones(2)}, stage.init(p), p)


def test_the_adam_stage_names_itself_when_refusing_its_rate():
    with pytest.raises(TypeError, match=r"^scale_by_adam: expected lr \(a float or a schedule step -> lr\) to be a real "
                                        r"number, got str$"):
        optim.scale_by_adam("0.1")


def test_the_adam_stage_names_itself_the_params_and_its_weight_decay_mask_when_refusing_them():
    p = {"a": torch.ones(2), "b": torch.ones(3)}
    stage = optim.scale_by_adam(0.1)
    with pytest.raises(ValueError, match=r"^scale_by_adam\.update: updates and params differ at 'b': unexpected in "
                                         r"updates \(not in params\)$"):
        stage.update(p, stage.init(p), {"a": torch.ones(2)})
    masked = optim.scale_by_adam(0.1, weight_decay=0.1, weight_decay_mask={"a": True, "b": 1})
    with pytest.raises(TypeError, match=r"^scale_by_adam\.update: expected mask leaves to be bools, got int at 'b'$"):
        masked.update(p, masked.init(p), p)


def test_adam_and_adamw_name_each_bad_hyperparameter_and_chain_a_state_of_the_wrong_shape_whole():
    for fn in ("adam", "adamw"):
        make = getattr(optim, fn)
        for kwargs, name, got in (({"betas": ("x", 0.999)}, r"betas\[0\]", "str"), ({"betas": (0.9, "x")}, r"betas\[1\]", "str"),
                                  ({"eps": "x"}, "eps", "str"), ({"weight_decay": None}, "weight_decay", "NoneType")):
            with pytest.raises(TypeError, match=rf"^{fn}: expected {name} to be a real number, got {got}$"):
                make(**kwargs)
        for flag in ("amsgrad", "maximize"):
            with pytest.raises(TypeError, match=rf"^{fn}: expected {flag} to be a bool, got int$"):
                make(**{flag: 1})
    chain, p = optim.chain(optim.negate(), optim.negate()), {"a": torch.ones(2)}
    for state, got in (("x", "str of length ?"), ((chain.init(p)[0],), "tuple of length 1"),
                       (list(chain.init(p)), "list of length ?")):
        with pytest.raises(ValueError, match="^" + re.escape(f"chain.update: expected a state tuple of 2 entries, got {got}") + "$"):
            chain.update(p, state, p)


def test_a_tensor_rate_must_be_0_d_floating_and_a_non_tensor_leaf_is_named_with_the_tree_holding_it():
    for lr, got in ((torch.ones(2), "torch.float32 of shape (2,)"), (torch.tensor(1), "torch.int64 of shape ()")):
        with pytest.raises(TypeError, match="^" + re.escape("scale_by_learning_rate: expected a tensor lr to be a 0-d "
                                                            f"floating tensor, got {got}") + "$"):
            optim.scale_by_learning_rate(lr)
    decay, p = optim.add_decayed_weights(0.1), {"a": torch.ones(2), "b": torch.ones(3)}
    bad = {"a": torch.ones(2), "b": 1.0}
    for updates, params, tree in ((p, bad, "params"), (bad, p, "updates")):
        with pytest.raises(TypeError, match=rf"^add_decayed_weights\.update: expected tensor leaves, got float in {tree} at 'b'$"):
            decay.update(updates, decay.init(p), params)
