"""Data parallelism (experiments.train.distributed, layers.parallel): 2 processes with gloo on the
CPU train what 1 process trains with the same global batch.

The 2-process runs are forked by the test (torch.multiprocessing, start method "fork": no
re-import of torch), each rank with one thread; the restart test runs torchrun itself.
"""
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import layers
import optim
from experiments.cifar import cli
from experiments.cifar.config import CifarConfig
from experiments.train.lifecycle import open_run
from experiments.data.augment import augment_batch, crop_offsets, cutout_mask, flip_mask
from experiments.data.dataset import Dataset
from experiments.train import distributed, fit, load_run
from layers import random as jr
from layers.parallel import BatchAxis, batch_axis
from nets.compose import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, as_net, serial
from random_cifar import write_random_cifar

WORLD = 2
BATCH = 8            # global batch: 4 rows per rank
EPOCHS = 2
STEPS = 6            # per epoch: 48 images / 8


def tiny_net():
    """conv - BN - ReLU - pool - dropout - linear: batch statistics and per-row draws."""
    return as_net(serial(features=serial(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(),
                                         MaxPool2d(2), Dropout(0.25)),
                         classifier=serial(Flatten(), Linear(4 * 4 * 4, 3))), name="tiny")


def tiny_data(n=48, classes=3, side=8):
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8),
                   torch.arange(n) % classes, tuple(f"c{i}" for i in range(classes)))


def train_tiny(dtype, run_dir, *, parallel=None, resume=False, max_epochs=None):
    """The run every test compares: SGD + momentum, crop + flip + cutout, dropout, batch norm."""
    net = tiny_net()
    params, state = net.init(jr.key(3), dtype=dtype)
    config = CifarConfig(epochs=EPOCHS, batch_size=BATCH, seed=5, device="cpu", sync_bn=True)
    augment = partial(augment_batch, crop=2, flip=True, cutout=3, dtype=dtype)
    run = open_run(run_dir, config, command="test", resume=resume)
    return fit(config, net=net, opt=optim.sgd(0.1, momentum=0.9), loss_fn=layers.cross_entropy,
               train=tiny_data(), augment=augment, params=params, state=state, run=run,
               max_epochs=max_epochs, quiet=True, parallel=parallel)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, world, port, timeout_s=60):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return distributed.start(CifarConfig(batch_size=BATCH, device="cpu", sync_bn=True),
                             timeout_s=timeout_s)


def _rank_main(rank, world, port, tmp):
    """One rank: the float64 and float32 runs (1 epoch each, every step checked for agreement),
    and the collectives on their own."""
    tmp = Path(tmp)
    parallel = _join(rank, world, port)
    parallel.check_every = 1
    out = {}
    try:
        for dtype in (torch.float64, torch.float32):
            # Rank 1 is handed a folder of its own: it must never be created.
            run = tmp / (f"run-{dtype}" if rank == 0 else f"rank{rank}-run-{dtype}")
            res = train_tiny(dtype, run, parallel=parallel, max_epochs=1)
            out[str(dtype)] = (res.status, res.params, res.state)
        parallel.sync_bn = False
        res = train_tiny(torch.float64, tmp / ("run-local" if rank == 0 else "rank1-run-local"),
                         parallel=parallel, max_epochs=1)
        out["local"] = (res.status, res.params, res.state)
        state = {"running_mean": torch.full((3,), float(rank)), "num_batches_tracked": torch.tensor(rank)}
        out["averaged"] = parallel.average_state(state)
        out["all_ok"] = (parallel.all_ok(True), parallel.all_ok(rank == 0))
        grads = {"w": torch.full((2, 2), float(rank + 1))}
        out["reduced"] = parallel.reduce(grads, {"loss": torch.tensor(float(rank)),
                                                 "correct": torch.tensor(rank + 2)})
        try:
            parallel.check_agreement({"w": torch.tensor([float(rank)])}, "in the test")
        except distributed.RanksDisagreeError as err:
            out["disagree"] = str(err)
    finally:
        distributed.stop(parallel)
    torch.save(out, tmp / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(_rank_main, args=(WORLD, _free_port(), str(tmp)), nprocs=WORLD,
                       start_method="fork")
    return tmp, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process runs: epoch 1 (stopped), and both epochs straight through, per dtype."""
    tmp = tmp_path_factory.mktemp("single")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {str(d): (train_tiny(d, tmp / f"a{d}", max_epochs=1), train_tiny(d, tmp / f"b{d}"))
                for d in (torch.float64, torch.float32)}
    finally:
        torch.set_num_threads(before)


def _close(a, b, tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


# --------------------------------------------------------------------------------------------
# The draws: a rank's slice gets the rows of the global draw


def test_offset_draws_are_the_rows_of_the_global_draw():
    k = jr.key(11)
    for offset, n in ((0, 7), (3, 5), (6, 10)):
        assert torch.equal(jr.bits(k, (n,), offset=offset), jr.bits(k, (offset + n,))[offset:])
        assert torch.equal(jr.randint(k, (n,), 0, 9, offset=offset), jr.randint(k, (offset + n,), 0, 9)[offset:])
        for res in (16, 32):   # 16 bits: two draws per word, so odd offsets start mid-word
            assert torch.equal(jr.bernoulli(k, 0.3, (n,), resolution_bits=res, offset=offset),
                               jr.bernoulli(k, 0.3, (offset + n,), resolution_bits=res)[offset:])


def test_augmentation_and_dropout_of_a_slice_equal_those_rows_of_the_whole_batch():
    k = jr.key(2)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    h = torch.randn(6, 5, 3, dtype=torch.float64)
    whole = augment_batch(k, x, crop=2, cutout=3)
    dropped = layers.dropout(h, p=0.5, train=True, key=k)
    for start in (0, 2, 4):
        with batch_axis(BatchAxis(start, 2, 6)):
            assert torch.equal(augment_batch(k, x[start:start + 2], crop=2, cutout=3),
                               whole[start:start + 2])
            assert torch.equal(layers.dropout(h[start:start + 2], p=0.5, train=True, key=k),
                               dropped[start:start + 2])
    assert torch.equal(crop_offsets(k, 6, 2)[4:], _in_axis(4, 2, 6, lambda: crop_offsets(k, 2, 2)))
    assert torch.equal(flip_mask(k, 6)[1:4], _in_axis(1, 3, 6, lambda: flip_mask(k, 3)))
    assert torch.equal(cutout_mask(k, 6, 8, 8, 3)[3:], _in_axis(3, 3, 6, lambda: cutout_mask(k, 3, 8, 8, 3)))


def _in_axis(start, rows, total, draw):
    with batch_axis(BatchAxis(start, rows, total)):
        return draw()


def test_a_layer_handed_other_rows_than_the_axis_says_is_refused_in_one_line():
    with batch_axis(BatchAxis(0, 4, 8)), pytest.raises(ValueError, match="expected this process's 4 rows"):
        layers.dropout(torch.ones(3, 2), p=0.5, train=True, key=jr.key(0))


# One process against batch norm: tests/test_layers_batch_norm.py
# (test_synced_batch_norm_of_one_process_has_batch_norms_gradients: forward, backward and state).


# --------------------------------------------------------------------------------------------
# 2 processes against 1


def test_two_processes_with_sync_bn_equal_one_process_in_float64(two_ranks, one_process):
    _, ranks = two_ranks
    status, params, state = ranks[0][str(torch.float64)]
    single = one_process[str(torch.float64)][0]
    assert status == "stopped" and single.status == "stopped"
    # 6 steps of SGD at lr 0.1 in float64: the two runs differ only in the order of sums (the
    # gradient mean over 2 ranks, batch statistics summed in halves). Measured: 4.7e-16
    # (params), 8.9e-16 (running stats); 1e-12 leaves three orders of margin, and local batch
    # statistics alone already move the parameters by more than 1e-4 (next test).
    _close(params, single.params, 1e-12)
    _close(state, single.state, 1e-12)


def test_without_sync_bn_the_statistics_stay_local_and_are_averaged_at_the_checkpoint(
        two_ranks, one_process):
    tmp, ranks = two_ranks
    (_, p0, s0), (_, p1, s1) = ranks[0]["local"], ranks[1]["local"]
    single = one_process[str(torch.float64)][0]
    gap = max(float((p0[k] - single.params[k]).abs().max()) for k in p0)
    assert gap > 1e-4, gap    # the tolerance above would catch unsynchronised statistics
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    # each rank carried on with the average, and that is what rank 0 saved
    saved, _, _ = load_run(tmp / "run-local")
    assert all(torch.equal(s0[k], s1[k]) and torch.equal(s0[k], saved["state"][k]) for k in s0)


def test_two_processes_with_sync_bn_equal_one_process_in_float32(two_ranks, one_process):
    _, ranks = two_ranks
    _, params, state = ranks[0][str(torch.float32)]
    single = one_process[str(torch.float32)][0]
    # float32 rounding (6e-8 relative per op) in the same sums, carried through 6 steps.
    # Measured: 2.7e-7 (params, which are below 0.66 in size), 2.4e-7 (running stats); 1e-5
    # leaves a margin of 40 and is still ten times below what local statistics do (> 1e-4).
    _close(params, single.params, 1e-5)
    _close(state, single.state, 1e-5)


def test_ranks_hold_bit_identical_parameters_after_every_step(two_ranks):
    # fit checked (params, opt_state) hashes across ranks after every step (check_every=1)
    # and raised otherwise; here the final trees are compared bit for bit too.
    _, ranks = two_ranks
    for dtype in (torch.float64, torch.float32):
        (_, p0, s0), (_, p1, s1) = ranks[0][str(dtype)], ranks[1][str(dtype)]
        assert all(torch.equal(p0[k], p1[k]) for k in p0)
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert "ranks [1]" in ranks[0]["disagree"] and "different hashes" in ranks[1]["disagree"]


def test_only_rank_zero_writes(two_ranks):
    tmp, _ = two_ranks
    for dtype in (torch.float64, torch.float32):
        assert {"checkpoint.safetensors", "config.json", "metrics.jsonl"} <= {
            p.name for p in (tmp / f"run-{dtype}").iterdir()}
        assert not (tmp / f"rank1-run-{dtype}").exists()


def test_collectives_average_gradients_and_state_and_sum_metrics_in_one_bucket(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert torch.equal(r["averaged"]["running_mean"], torch.full((3,), 0.5))
        assert r["averaged"]["num_batches_tracked"] is not None
        grads, metrics = r["reduced"]
        assert torch.equal(grads["w"], torch.full((2, 2), 1.5))
        assert float(metrics["loss"]) == 0.5 and int(metrics["correct"]) == 5
        assert r["all_ok"] == (True, False)


def test_a_two_process_checkpoint_resumes_on_one_process(two_ranks, one_process):
    tmp, _ = two_ranks
    resumed = train_tiny(torch.float64, tmp / f"run-{torch.float64}", resume=True)
    straight = one_process[str(torch.float64)][1]
    assert resumed.status == "done" and [r["epoch"] for r in resumed.history] == [1, 2]
    # as the float64 test: 12 steps, rounding order only (measured 1.0e-15)
    _close(resumed.params, straight.params, 1e-12)
    _close(resumed.state, straight.state, 1e-12)


# --------------------------------------------------------------------------------------------
# Refusals: one line each


def test_a_world_size_that_does_not_divide_the_batch_is_refused_before_anything_starts(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    code = cli.main("cifar_model_a", "A", ["--batch-size", "20", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "expected a multiple of the 3 processes" in err and "got 20 = 6 x 3 + 2" in err
    assert not any(tmp_path.iterdir())


def test_a_refusal_is_printed_by_rank_zero_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main("cifar_model_a", "A", ["--lr", "-1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main("cifar_model_a", "A", ["--lr", "-1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --lr")


def test_the_resume_note_says_how_batch_norm_normalises_on_more_processes():
    class World:
        world = 4

    per_rank = distributed.batch_norm_note(CifarConfig(batch_size=512), World())
    assert "each process's 128 images" in per_rank and "pass --sync-bn" in per_rank
    synced = distributed.batch_norm_note(CifarConfig(batch_size=512, sync_bn=True), World())
    assert "over the global batch of 512" in synced


def _lonely_rank(rank, port, tmp):
    try:
        _join(0, 2, port, timeout_s=2)
    except distributed.StartError as err:
        Path(tmp, "error.txt").write_text(str(err))


def test_a_rank_that_never_starts_gives_one_clear_error(tmp_path):
    mp.start_processes(_lonely_rank, args=(_free_port(), str(tmp_path)), nprocs=1,
                       start_method="fork")
    err = (tmp_path / "error.txt").read_text()
    assert len(err.splitlines()) == 1
    assert err.startswith("distributed: rank 0 of 2 could not form the gloo process group")
    assert "a rank failed to start" in err


# --------------------------------------------------------------------------------------------
# torchrun: a killed rank, then the restart resumes


def test_torchrun_restarts_a_killed_rank_and_the_run_resumes(tmp_path):
    # 4 train images per class (2 steps of 20), 1 test image
    data = write_random_cifar(tmp_path / "c10", 4, 1)
    flags = ["--data-dir", str(data), "--epochs", "3", "--batch-size", "20", "--val-split", "0",
             "--no-bf16", "--no-channels-last", "--no-test", "--sync-bn", "--seed", "1",
             "--out", str(tmp_path / "runs"), "--name", "r"]
    env = {**os.environ, "PURENN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--max-restarts", "1", "--monitor-interval", "0.2",
         str(Path(__file__).with_name("distributed_worker.py")), *flags],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "killing rank 1 at epoch 2, step 1" in proc.stderr
    assert "torchrun restart 1: resuming" in proc.stderr
    # rank 0 alone prints the data line: once for the first attempt, once for the restart
    assert proc.stderr.count("data: ") == 2, proc.stderr[-3000:]
    assert "resuming on 2 processes with --sync-bn: batch norm normalises over the global batch" in proc.stderr
    run = tmp_path / "runs" / "r"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    tree, progress, _ = load_run(run)
    assert progress["epoch"] == 3
    # The same command on one process, uninterrupted: the same model. float32, 6 steps of
    # Model A, rounding-order differences only, as the float32 test above: measured 2.9e-6;
    # 1e-4 leaves a margin of 30.
    assert cli.main("cifar_model_a", "A", flags[:-1] + ["single"]) == 0
    single, _, _ = load_run(tmp_path / "runs" / "single")
    _close(tree["params"], single["params"], 1e-4)
