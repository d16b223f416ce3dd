"""Read the history rows of an offline W&B run from its ``run-<id>.wandb`` record log.

wandb 0.31 ships no reader, so this parses the LevelDB-style log: a 7-byte header
(``:W&B``, magic, version), then 32 KiB blocks of records, each with a 7-byte header
(crc32 4, length 2, type 1: FULL=1, FIRST=2, MIDDLE=3, LAST=4) around a serialized
``wandb_internal_pb2.Record``. A record never spans a block boundary without a
FIRST/MIDDLE/LAST split, and a block tail under 7 bytes is zero padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def history(path: str | Path) -> list[dict]:
    """One dict per logged row: ``_step`` plus the logged keys, values JSON-decoded."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_files(output_dir: str | Path) -> list[Path]:
    return sorted(Path(output_dir).glob("wandb/*run-*/run-*.wandb"))
