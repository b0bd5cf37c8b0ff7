"""Cluster pieces in one process: launcher variables, the rank-agreement helpers alone, TensorBoard/CSV files,
per-rank checkpoint state and the world-size record (issue 28). The multi-process behaviour is in
test_multinode.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from guard_fast.runtime import distributed as D
from guard_fast.runtime.config import DistConfig, load_config
from guard_fast.runtime.errors import CheckpointError, ConfigError, GuardFastError


@pytest.mark.parametrize("env, local", [
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, 2),      # torchrun: 2 nodes x 2
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "1"}, 1),            # deepspeed launcher: 2 nodes x 1 (sets LOCAL_SIZE only)
    ({"WORLD_SIZE": "3"}, 3),                               # a launcher that says nothing per node
    ({}, 1),
])
def test_threads_follow_processes_per_node_under_every_launcher(env, local, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert D.local_world_size(env) == local
    assert D.cpu_threads(DistConfig(), env) == 8 // local
    assert D.cpu_threads(DistConfig(cpu_threads=3), env) == 3


def test_dist_and_output_keys_are_checked():
    with pytest.raises(ConfigError, match="dist.timeout_s"):
        load_config(DistConfig, None, ["--timeout_s=0"])
    from guard_fast.runtime.config import OutputConfig

    with pytest.raises(ConfigError, match="output.loggers = \\['wandb'\\]"):
        load_config(OutputConfig, None, ["--loggers=tensorboard,wandb"])


def test_agreement_helpers_alone_pass_results_and_errors_through():
    assert D.decide_on_main(lambda: {"tag": "x"}) == {"tag": "x"}
    with pytest.raises(GuardFastError, match="boom"):
        D.decide_on_main(lambda: (_ for _ in ()).throw(GuardFastError("boom")))
    with pytest.raises(ValueError, match="bad"), D.setup_phase():
        raise ValueError("bad")
    with D.setup_phase():
        pass


def test_lost_peer_errors_become_one_line_and_others_do_not():
    line = D.lost_ranks(RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer\nmore"))
    assert line and "lost the other ranks" in line and "\n" not in line
    assert "timeout_s" in D.lost_ranks(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv"))
    assert D.lost_ranks(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    hint = D.lost_ranks(RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: "
                                     "SO_ERROR: Connection refused, remote=[127.0.0.1]:13715"))
    assert "GLOO_SOCKET_IFNAME" in hint and "could not connect" in hint


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard event files, read back with an independent decoder of the TFRecord and protobuf wire formats


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if not b & 0x80:
            return value, i


def decode(buf: bytes) -> dict[int, list]:
    """Protobuf wire format -> {field number: [raw values]} (varint int, fixed64/32 bytes, length-delimited bytes)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            assert wire == 2, wire
            n, i = read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        out.setdefault(number, []).append(value)
    return out


def read_records(path: Path) -> list[bytes]:
    from guard_fast.runtime.metrics import masked_crc

    data, i, records = path.read_bytes(), 0, []
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc(header)
        payload = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked_crc(payload)
        records.append(payload)
        i += 16 + n
    return records


def test_crc32c_matches_the_published_check_values():
    from guard_fast.runtime.metrics import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720 B.4: 0x00..0x1F


def test_tensorboard_events_and_csv_round_trip_with_resume_purge(tmp_path):
    from guard_fast.runtime.metrics import MetricSinks

    sinks = MetricSinks(tmp_path, ["tensorboard", "csv"], is_main=True, resumed_step=None)
    for step in (1, 2, 3):
        sinks.write({"time": 100.0 + step, "step": step, "loss": 1.0 / step, "epoch": 0, "skipped": {"a": 1}})
    resumed = MetricSinks(tmp_path, ["tensorboard", "csv"], is_main=True, resumed_step=2)
    resumed.write({"time": 200.0, "step": 3, "loss": 0.25, "val_clean": 0.5})
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    first = [decode(r) for r in read_records(sinks.tb.path)]
    assert first[0][3] == [b"brain.Event:2"]
    scalars = []
    for ev in first[1:]:
        for value in decode(ev[5][0])[1]:
            v = decode(value)
            scalars.append((ev[2][0], v[1][0].decode(), struct.unpack("<f", v[2][0])[0],
                            struct.unpack("<d", ev[1][0])[0]))  # (step, tag, value, wall time)
    assert [(s, t) for s, t, _, _ in scalars] == [(1, "loss"), (1, "epoch"), (2, "loss"), (2, "epoch"), (3, "loss"),
                                                  (3, "epoch")]
    assert scalars[4][2] == pytest.approx(1 / 3) and scalars[4][3] == 103.0
    second = [decode(r) for r in read_records(resumed.tb.path)]
    assert second[1][2] == [3] and decode(second[1][7][0])[1] == [1]  # SessionLog START after the resumed step
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "time,step,name,value"
    assert [r.split(",")[1:3] for r in rows[1:]] == [["1", "loss"], ["1", "epoch"], ["2", "loss"], ["2", "epoch"],
                                                     ["3", "loss"], ["3", "val_clean"]]  # step 3 of the first start cut


def test_no_extra_files_unless_asked(tmp_path):
    from guard_fast.runtime.metrics import MetricSinks

    MetricSinks(tmp_path, [], is_main=True, resumed_step=None).write({"step": 1, "loss": 1.0})
    MetricSinks(tmp_path / "r1", ["tensorboard", "csv"], is_main=False, resumed_step=None).write({"step": 1})
    assert not any(tmp_path.rglob("*"))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: every rank's buffers and RNG, the world size and global batch


def bn_engine(seed: int):
    from guard_fast.runtime.engine import OptimConfig, build_engine, build_optimizer, build_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optim = OptimConfig(name="sgd", lr=0.1, epochs=2)
    opt = build_optimizer(model, optim)
    return build_engine(model, opt, build_scheduler(opt, optim, 4), DistConfig(), optim, 4, torch.device("cpu"))


def test_checkpoint_restores_this_ranks_buffers_and_rng_and_records_the_layout(tmp_path):
    from guard_fast.runtime.checkpoint import Checkpointer

    engine = bn_engine(0)
    engine.train()
    engine(torch.randn(4, 4) * 3 + 1)  # running statistics move away from (0, 1)
    ckpt = Checkpointer(tmp_path, engine)
    ckpt.save(1, {"epoch": 0})
    saved_mean = engine.module[1].running_mean.clone()
    after = torch.rand(3)  # what the RNG gives next after the save
    entry = json.loads((tmp_path / "latest.json").read_text())
    assert {k: entry[k] for k in ("world_size", "global_batch", "micro_batch", "grad_accum")} == {
        "world_size": 1, "global_batch": 4, "micro_batch": 4, "grad_accum": 1}
    fresh = Checkpointer(tmp_path, bn_engine(1))
    torch.rand(5)
    step, _ = fresh.load(fresh.resumable_point())
    assert step == 1 and torch.equal(fresh.engine.module[1].running_mean, saved_mean)
    assert not torch.equal(saved_mean, torch.zeros(3))
    assert torch.equal(torch.rand(3), after)


def test_resume_on_another_world_size_or_global_batch_is_refused(tmp_path):
    from guard_fast.runtime.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, bn_engine(0))
    point = {"tag": "step000000004", "step": 4, "world_size": 2, "global_batch": 8, "micro_batch": 4,
             "grad_accum": 1}
    with pytest.raises(CheckpointError, match="written by 2 rank\\(s\\) with a global batch of 8; this run has 1 "
                                              "rank\\(s\\) and a global batch of 4"):
        ckpt.check_resumable(point)
    with pytest.raises(CheckpointError, match="global batch of 16"):
        ckpt.check_resumable({**point, "world_size": 1, "global_batch": 16})
    with pytest.raises(CheckpointError, match="does not record its world size"):
        ckpt.check_resumable({"tag": "step000000004", "step": 4})
    assert ckpt.check_resumable({**point, "world_size": 1, "global_batch": 4}) is not None
