"""Reads back the history of an offline wandb run (``WANDB_MODE=offline``).

wandb 0.31 ships no Python reader for its run files: ``run-ID.wandb`` is a
LevelDB-style log (a 7-byte header ``:W&B`` + magic + version, then 32 KiB
blocks of records, each with a 7-byte header: CRC32C, length, type FULL /
FIRST / MIDDLE / LAST) of wandb's own protobuf ``Record`` messages, which
wandb's ``wandb_internal_pb2`` parses. Only the framing is written here."""

import glob
import json
import os
import struct

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path):
    """The raw records of a ``.wandb`` file, in order."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
    return out


def offline_history(out_dir):
    """The logged history rows (``wandb.log`` calls, ``_step`` order) of the
    one offline run under ``out_dir/wandb``, without wandb's ``_``-keys."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    rows = []
    for raw in records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            rows.append((row["_step"], {k: v for k, v in row.items() if not k.startswith("_")}))
    return [r for _, r in sorted(rows, key=lambda x: x[0])]
