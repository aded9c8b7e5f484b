"""Read back what an offline W&B run recorded: the history keys and the number of images, from its .wandb file.

The file is a LevelDB-style log of protobuf ``Record`` messages: a 7-byte file header, then 32 KiB blocks of
chunks, each chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import glob
import os
import struct
import time

BLOCK = 32768


def records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history_keys(run_dir: str, timeout: float = 60) -> set[str]:
    """Every key logged to the run's history (``run_dir``: the ``offline-run-*`` folder or a parent of it).

    W&B's background process finishes the file after ``wandb.finish()`` returns: wait for each file's exit record.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = glob.glob(os.path.join(run_dir, "**", "*.wandb"), recursive=True)
        parsed = [list(records(path)) for path in files]
        finished = all(any(r.WhichOneof("record_type") == "exit" for r in rs) for rs in parsed)
        if files and finished or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert files, f"no .wandb file under {run_dir}"
    keys = set()
    for rs in parsed:
        for record in rs:
            if record.WhichOneof("record_type") == "history":
                keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys
