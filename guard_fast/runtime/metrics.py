"""Training metrics beside metrics.jsonl, behind one switch (`output.loggers`): TensorBoard event files and a CSV.

TensorBoard is not a dependency: `TensorBoardWriter` writes its event files itself. An event file is a sequence of
TFRecords (u64 length, masked CRC-32C of the length, payload, masked CRC-32C of the payload; all little-endian), each
payload a serialized `tensorflow.Event` protobuf (fields used: wall_time = 1 double, step = 2 int64, file_version = 3
string, summary = 5 {value = 1 {tag = 1 string, simple_value = 2 float}}, session_log = 7 {status = 1 enum,
START = 1}). A resumed run opens a new file whose first event after the version is SessionLog START at the step after
the checkpoint: TensorBoard then drops the older files' points from that step on, as for torch's
SummaryWriter(purge_step). Checked once against tensorboard 2.21's EventAccumulator (values, steps, the purge).

metrics.csv is long ("tidy") so that lines with different keys (training steps, validations) share one header:
`time,step,name,value`.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from guard_fast.runtime.io import atomic_text


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc(header)) + payload + struct.pack("<I", masked_crc(payload))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _message(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, scalars: dict[str, float] | None = None, file_version: str = "",
          session_start: bool = False) -> bytes:
    """One serialized Event: scalars as Summary values, or the file-version header, or a SessionLog START."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version:
        out += _message(3, file_version.encode())
    if scalars:
        values = b"".join(_message(1, _message(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _message(5, values)
    if session_start:
        out += _message(7, _field(1, 0) + _varint(1))
    return out


class TensorBoardWriter:
    """Appends scalar events to a new event file in `folder` (one file per start of the run)."""

    def __init__(self, folder: str | Path, purge_step: int | None = None):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        stem = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = next(p for i in range(1 << 16) if not (p := folder / f"{stem}.{i}").exists())
        records = [event(now, 0, file_version="brain.Event:2")]
        if purge_step is not None:
            records.append(event(now, purge_step, session_start=True))
        self._append(records)

    def _append(self, payloads: list[bytes]) -> None:
        with open(self.path, "ab") as f:
            f.write(b"".join(map(tfrecord, payloads)))

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        self._append([event(time.time() if wall_time is None else wall_time, step, scalars=values)])


def trim_csv(path: Path, step: int) -> None:
    """Drop rows past `step` (logged after the checkpoint a resumed run restarts from) and a row a kill cut short."""
    if not path.is_file():
        return
    rows = list(csv.reader(io.StringIO(path.read_text())))
    header, body = rows[:1], rows[1:]
    kept = [r for r in body if len(r) == 4 and r[1].isdigit() and int(r[1]) <= step]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(header + kept)
    atomic_text(path, out.getvalue())


class MetricSinks:
    """The extra outputs `output.loggers` asks for, written by rank 0 for every metrics line the loop logs."""

    def __init__(self, folder: str | Path, loggers: list[str], is_main: bool, resumed_step: int | None):
        self.folder, self.csv = Path(folder), None
        self.tb = None
        if not is_main:
            return
        if "tensorboard" in loggers:
            # TensorBoard drops the older files' points at steps >= purge_step: keep those up to the checkpoint
            self.tb = TensorBoardWriter(self.folder / "tensorboard",
                                        purge_step=None if resumed_step is None else resumed_step + 1)
        if "csv" in loggers:
            self.csv = self.folder / "metrics.csv"
            if resumed_step is not None:
                trim_csv(self.csv, resumed_step)
            if not self.csv.is_file() or not self.csv.stat().st_size:
                self.csv.write_text("time,step,name,value\n")

    def write(self, record: dict[str, Any]) -> None:
        scalars = {k: float(v) for k, v in record.items()
                   if k not in ("time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        now, step = record.get("time", time.time()), int(record["step"])
        if self.tb is not None:
            self.tb.scalars(step, scalars, now)
        if self.csv is not None:
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows([round(now, 3), step, k, v] for k, v in scalars.items())
            with open(self.csv, "a") as f:
                f.write(out.getvalue())
