"""Read the records of an offline W&B run file (`run-*.wandb`), for tests.

The file is a LevelDB-style log (https://github.com/google/leveldb/blob/main/doc/log_format.md)
of protobuf `Record`s: a 7-byte file header (":W&B", magic, version), then 32 KiB blocks of
chunks, each with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST). wandb no longer
ships a Python reader for it, so this is a minimal one (checksums not verified).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    """Yield every `wandb_internal_pb2.Record` in the file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        block_left = BLOCK - pos % BLOCK
        if block_left < 7:  # block trailer: too small for a chunk header
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding at the end of the written part
            break
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    """An item's key: newer wandb versions fill `nested_key` instead of `key`."""
    return item.key or "/".join(item.nested_key)


def history(path: str | Path) -> list[dict]:
    """The logged metric rows, in order, as {key: value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return rows


def config(path: str | Path) -> dict:
    """The run config, merged over all config records."""
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                out[_key(item)] = json.loads(item.value_json)
    return out
