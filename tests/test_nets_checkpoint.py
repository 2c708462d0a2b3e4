"""Specification of nets.checkpoint: bit-exact, inspectable, atomic, and loud when wrong."""

import json
import math
import os
import struct
import tempfile
from collections import OrderedDict
from typing import NamedTuple

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nets import checkpoint
from nets.checkpoint import CheckpointError, CheckpointMismatchError, load, save

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
          torch.bool]


class Pair(NamedTuple):
    first: object
    second: object


class AdamState(NamedTuple):  # the shape of optax's ScaleByAdamState
    count: torch.Tensor
    mu: dict
    nu: dict


# ------------------------------------------------------------------------------ strategies


@st.composite
def tensors(draw):
    """Tensors of every stored dtype and of shapes incl. 0-d and empty, with arbitrary bits.

    The bytes are random, so float tensors hold NaNs with payloads, infinities, -0.0 and
    subnormals: the round trip must keep every bit, not just the value.
    """
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    numel = math.prod(shape)
    if dtype == torch.bool:  # a bool byte other than 0 / 1 is not a valid bool
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


leaves = st.one_of(
    tensors(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
keys = st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
               max_size=6)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
        st.builds(Pair, children, children),
    ),
    max_leaves=12,
)
json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
metadatas = st.none() | st.dictionaries(st.text(max_size=5), json_data, max_size=4)


# ------------------------------------------------------------------------------- helpers


def bits(t):
    """The bytes of a tensor: equal bits, NaN payloads and signed zeros included."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(got, want, path="<root>"):
    """Same container types (and key order), same leaf types, bit-identical leaves."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(bits(got), bits(want)), path
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), f"{path}: {got} vs {want}"
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_identical(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_identical(a, b, f"{path}/{i}")
    else:
        assert got == want, path


def namedtuples_as_dicts(tree):
    """What ``load`` without ``like`` promises: NamedTuples become dicts keyed by field."""
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        return {f: namedtuples_as_dicts(v) for f, v in zip(type(tree)._fields, tree)}
    if isinstance(tree, dict):
        return {k: namedtuples_as_dicts(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(namedtuples_as_dicts(v) for v in tree)
    return tree


def small_net():
    """Params / state keyed like a real torch module, and an Adam-shaped optimizer state."""
    g = torch.Generator().manual_seed(0)
    params = {"features.0.weight": torch.randn(4, 3, 3, 3, generator=g),
              "features.0.bias": torch.randn(4, generator=g),
              "features.1.weight": torch.ones(4), "features.1.bias": torch.zeros(4),
              "classifier.weight": torch.randn(10, 4, generator=g),
              "classifier.bias": torch.zeros(10)}
    state = {"features.1.running_mean": torch.zeros(4), "features.1.running_var": torch.ones(4),
             "features.1.num_batches_tracked": torch.tensor(7)}
    opt_state = (AdamState(torch.tensor(7), {k: v * 0.5 for k, v in params.items()},
                           {k: v * v for k, v in params.items()}),)
    return {"params": params, "state": state, "opt_state": opt_state, "step": 7,
            "key": torch.tensor([12345, 678], dtype=torch.int64)}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.safetensors"
    tree = small_net()
    save(path, tree, {"epoch": 3})
    return path, tree


# ------------------------------------------------------------------------------ round trip


@settings(deadline=None, max_examples=60)
@given(tree=trees, metadata=metadatas)
def test_round_trip_with_like_is_bit_exact_and_keeps_every_type(tree, metadata):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        save(path, tree, metadata)
        got, got_meta = load(path, like=tree)
    assert_identical(got, tree)
    assert got_meta == metadata


@settings(deadline=None, max_examples=40)
@given(tree=trees)
def test_round_trip_without_like_rebuilds_containers_with_namedtuples_as_dicts(tree):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        save(path, tree)
        got, got_meta = load(path)
    assert_identical(got, namedtuples_as_dicts(tree))
    assert got_meta is None


def test_round_trip_of_a_training_checkpoint_restores_namedtuple_optimizer_state(ckpt):
    path, tree = ckpt
    got, meta = load(path, like=tree)
    assert_identical(got, tree)
    assert isinstance(got["opt_state"][0], AdamState)
    assert meta == {"epoch": 3}


def test_like_dict_subclasses_are_rebuilt_with_their_type(tmp_path):
    tree = OrderedDict(b=torch.ones(2), a=OrderedDict(c=1))
    save(tmp_path / "c", tree)
    got, _ = load(tmp_path / "c", like=tree)
    assert_identical(got, tree)


def test_file_stores_each_leaf_under_its_tree_path_with_json_metadata(ckpt):
    path, tree = ckpt
    with safetensors.safe_open(path, framework="pt") as f:
        names = set(f.keys())
        meta = f.metadata()
    assert names == {
        *(f"params/{k}" for k in tree["params"]), *(f"state/{k}" for k in tree["state"]),
        "opt_state/0/count", *(f"opt_state/0/mu/{k}" for k in tree["params"]),
        *(f"opt_state/0/nu/{k}" for k in tree["params"]), "step", "key"}
    assert meta["format"] == "purenn.checkpoint" and meta["format_version"] == "1"
    assert json.loads(meta["metadata"]) == {"epoch": 3}
    structure = json.loads(meta["structure"])
    assert structure["items"]["opt_state"]["items"][0]["kind"] == "namedtuple"
    assert structure["items"]["step"] == {"kind": "int", "path": "step"}


def test_python_scalars_are_stored_as_0d_tensors_of_their_type(tmp_path):
    save(tmp_path / "c", {"i": 3, "f": 0.1, "b": True})
    stored = safetensors.torch.load_file(tmp_path / "c")
    assert stored["i"].dtype == torch.int64 and stored["i"].shape == () and stored["i"] == 3
    assert stored["f"].dtype == torch.float64 and stored["f"].item() == 0.1
    assert stored["b"].dtype == torch.bool and bool(stored["b"])


def test_saves_contiguous_cpu_copies_of_views_tied_and_grad_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    w = torch.randn(2, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    tree = {"t": base.t(), "step": base[:, ::2], "tied_a": base, "tied_b": base, "w": w}
    save(tmp_path / "c", tree)
    base.add_(100)  # later changes to the tree must not reach the file
    got, _ = load(tmp_path / "c")
    ref = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(got["t"], ref.t()) and torch.equal(got["step"], ref[:, ::2])
    assert torch.equal(got["tied_a"], ref) and torch.equal(got["tied_b"], ref)
    assert torch.equal(got["w"], w.detach()) and not got["w"].requires_grad
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in got.values())


def test_load_device_argument_moves_tensors_but_keeps_scalars(ckpt):
    path, tree = ckpt
    got, _ = load(path, like=tree, device="meta")  # meta: a second device on every machine
    assert got["params"]["classifier.weight"].device.type == "meta"
    assert got["step"] == 7 and type(got["step"]) is int


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_saved_and_load_to_cpu_unless_device_given(tmp_path):
    tree = {"w": torch.randn(3, 3, generator=torch.Generator().manual_seed(2)).cuda()}
    save(tmp_path / "c", tree)
    got, _ = load(tmp_path / "c")
    assert got["w"].device.type == "cpu" and torch.equal(got["w"], tree["w"].cpu())
    got, _ = load(tmp_path / "c", device="cuda")
    assert got["w"].is_cuda and torch.equal(got["w"], tree["w"])


# -------------------------------------------------------------------------- architecture


def test_different_architecture_reports_missing_unexpected_misshaped_mistyped_at_once(ckpt):
    path, tree = ckpt
    like = small_net()
    del like["params"]["classifier.bias"]                                 # unexpected
    like["params"]["classifier2.weight"] = torch.zeros(10, 4)             # missing
    like["params"]["features.0.weight"] = torch.zeros(8, 3, 3, 3)         # mis-shaped
    like["state"]["features.1.running_var"] = torch.ones(4, dtype=torch.float64)  # mis-typed
    like["step"] = 7.0                                                    # int vs float
    with pytest.raises(CheckpointMismatchError) as info:
        load(path, like=like)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["params/classifier2.weight"]
    assert err.unexpected == ["params/classifier.bias"]
    assert err.misshaped == [("params/features.0.weight", (4, 3, 3, 3), (8, 3, 3, 3))]
    assert err.mistyped == [("state/features.1.running_var", "float32", "float64"),
                            ("step", "int", "float")]
    message = str(err)
    for expected in (str(path), "missing", "params/classifier2.weight", "unexpected",
                     "params/classifier.bias", "mis-shaped",
                     "params/features.0.weight: file (4, 3, 3, 3), like (8, 3, 3, 3)",
                     "mis-typed", "state/features.1.running_var: file float32, like float64",
                     "step: file int, like float"):
        assert expected in message


def test_like_with_a_plain_tuple_where_a_namedtuple_was_saved_reports_paths(ckpt):
    path, tree = ckpt
    like = dict(tree, opt_state=(tuple(tree["opt_state"][0]),))
    with pytest.raises(CheckpointMismatchError) as info:
        load(path, like=like)
    assert "opt_state/0/0" in info.value.missing and "opt_state/0/count" in info.value.unexpected


# ------------------------------------------------------------------------- broken files


def _valid_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("content, phrase", [
    (b"", "is empty"),
    (b"\x01\x02\x03", "too short"),
    ((10**12).to_bytes(8, "little") + b"{}", "bad header length"),
    ((12).to_bytes(8, "little") + b"not json!!!!", "not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "expected a JSON object"),
    (bytes(range(256)) * 4, "bad header length"),  # garbage
])
def test_broken_bytes_raise_checkpoint_error_naming_file_and_problem(tmp_path, content, phrase):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=phrase) as info:
        load(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_truncated_tensor_data_is_reported_as_truncated(ckpt):
    path, _ = ckpt
    path.write_bytes(_valid_bytes(path)[:-5])
    with pytest.raises(CheckpointError, match="is truncated"):
        load(path)


@settings(deadline=None, max_examples=60)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_a_file_cut_anywhere_raises_checkpoint_error(cut):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        save(path, small_net(), {"epoch": 1})
        data = _valid_bytes(path)
        with open(path, "wb") as f:
            f.write(data[:int(cut * len(data))])
        with pytest.raises(CheckpointError, match="c.safetensors"):
            load(path)


@settings(deadline=None, max_examples=80)
@given(where=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255))
def test_any_changed_byte_either_loads_or_raises_checkpoint_error(where, byte):
    # Bytes in the tensor data change values (no checksum); anywhere else the damage must
    # surface as a CheckpointError, never as an exception from deep inside a library.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        save(path, small_net(), {"epoch": 1})
        data = bytearray(_valid_bytes(path))
        data[int(where * len(data))] = byte
        with open(path, "wb") as f:
            f.write(data)
        try:
            load(path)
        except CheckpointError:
            pass


def test_plain_safetensors_file_is_not_a_purenn_checkpoint(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a purenn checkpoint"):
        load(tmp_path / "plain.safetensors")


def _rewrite_meta(path, **changes):
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        meta = f.metadata()
    safetensors.torch.save_file(tensors, path, metadata={**meta, **changes})


@pytest.mark.parametrize("changes, phrase", [
    ({"format_version": "2"}, "format version 2"),
    ({"format_version": "one"}, "no valid format_version"),
    ({"structure": "{oops"}, "corrupted 'structure'"),
    ({"metadata": "[1, 2]"}, "corrupted 'metadata'"),
    ({"structure": json.dumps({"kind": "tensor", "path": ""})}, "does not hold"),
    ({"structure": json.dumps({"kind": "set", "items": []})}, "got kind 'set'"),
    ({"structure": json.dumps({"kind": "dict", "items": {}})}, "not in its structure"),
])
def test_corrupted_purenn_metadata_raises_checkpoint_error(ckpt, changes, phrase):
    path, _ = ckpt
    _rewrite_meta(path, **changes)
    with pytest.raises(CheckpointError, match=phrase):
        load(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- atomic write


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_old_file_intact_and_no_temp_file(ckpt, monkeypatch, error):
    path, tree = ckpt
    before = _valid_bytes(path)

    def half_then_crash(f, data):
        f.write(data[:len(data) // 2])
        raise error

    monkeypatch.setattr(checkpoint, "_write_all", half_then_crash)
    with pytest.raises(type(error)):
        save(path, {"other": torch.zeros(5)}, {"epoch": 4})
    assert _valid_bytes(path) == before
    assert os.listdir(path.parent) == [path.name]
    got, meta = load(path, like=tree)
    assert_identical(got, tree)
    assert meta == {"epoch": 3}


def test_crash_before_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    def crash(f, data):
        f.write(data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_all", crash)
    with pytest.raises(OSError):
        save(tmp_path / "c", {"w": torch.ones(3)})
    assert os.listdir(tmp_path) == []


def test_temp_file_is_fsynced_in_target_directory_before_rename(ckpt, monkeypatch):
    path, tree = ckpt
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.dirname(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save(path, tree)
    assert events[0] == "fsync"
    assert events[1] == ("replace", str(path.parent), str(path))


def test_failed_rename_removes_the_temp_file(tmp_path):
    target = tmp_path / "is_a_directory"
    (target / "child").mkdir(parents=True)
    with pytest.raises(OSError):
        save(target, {"w": torch.ones(3)})
    assert sorted(os.listdir(tmp_path)) == ["is_a_directory"]


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save(tmp_path / "no" / "c.safetensors", {"w": torch.ones(1)})


# ------------------------------------------------------------------------ invalid input


@pytest.mark.parametrize("tree, error, phrase", [
    ({1: torch.ones(1)}, TypeError, "expected str keys in the root dict"),
    ({"a": {"b/c": torch.ones(1)}}, ValueError, "without '/' in dict at 'a'"),
    ({"a": ["text"]}, TypeError, "at 'a/0', got str"),
    ({"step": 2**63}, ValueError, "within int64 range"),
    ({"__metadata__": torch.ones(1)}, ValueError, "safetensors reserves"),
    ({"s": torch.ones(2).to_sparse()}, TypeError, "dense"),
])
def test_invalid_trees_are_rejected_before_writing(tmp_path, tree, error, phrase):
    with pytest.raises(error, match=phrase):
        save(tmp_path / "c", tree)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("metadata, error, phrase", [
    ([1, 2], TypeError, "dict or None"),
    ({"x": object()}, TypeError, "JSON-serialisable"),
    ({"loss": float("nan")}, ValueError, "JSON-serialisable"),
    ({"shape": (3, 4)}, ValueError, "survives a JSON round trip"),
    ({"by_epoch": {1: 0.5}}, ValueError, "survives a JSON round trip"),
])
def test_metadata_must_round_trip_through_json(tmp_path, metadata, error, phrase):
    with pytest.raises(error, match=phrase):
        save(tmp_path / "c", {"w": torch.ones(1)}, metadata)
    assert os.listdir(tmp_path) == []


def test_like_with_foreign_leaf_type_is_a_type_error(ckpt):
    path, tree = ckpt
    with pytest.raises(TypeError, match="like's leaves"):
        load(path, like=dict(tree, step="seven"))
