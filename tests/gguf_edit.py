"""Copies a GGUF file with one string key set to another value (the tests' way to give a model
another chat template). Only the header changes; tensor data is copied as it is, re-aligned."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# Sizes of the fixed-size value types, by GGUF type id; 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _U32 = 8, 9, 4


def _read(f: BinaryIO, fmt: str) -> int:
    return int(struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0])


def _string(f: BinaryIO) -> bytes:
    return f.read(_read(f, "Q"))


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        _string(f)
    elif kind == _ARRAY:
        item_kind, count = _read(f, "I"), _read(f, "Q")
        if item_kind in _FIXED:
            f.seek(_FIXED[item_kind] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_kind)
    else:
        f.seek(_FIXED[kind], 1)


def _gguf_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def with_string(source: Path, target: Path, key: str, value: str) -> None:
    """Writes `source` to `target` with metadata `key` set to the string `value`."""
    with source.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{source} is not a GGUF file")
        version, tensors, keys = _read(f, "I"), _read(f, "Q"), _read(f, "Q")
        entries: list[bytes] = []
        alignment = 32
        for _ in range(keys):
            start = f.tell()
            name = _string(f)
            kind = _read(f, "I")
            value_start = f.tell()
            _skip_value(f, kind)
            end = f.tell()
            if name == key.encode():
                continue
            if name == b"general.alignment" and kind == _U32:
                f.seek(value_start)
                alignment = _read(f, "I")
                f.seek(end)
            f.seek(start)
            entries.append(f.read(end - start))
        entries.append(_gguf_string(key.encode()) + struct.pack("<I", _STRING) + _gguf_string(value.encode()))
        infos_start = f.tell()
        for _ in range(tensors):
            _string(f)
            dims = _read(f, "I")
            f.seek(8 * dims + 4 + 8, 1)
        infos_end = f.tell()
        f.seek(infos_start)
        infos = f.read(infos_end - infos_start)
        data_start = -(-infos_end // alignment) * alignment
        f.seek(data_start)
        data = f.read()

    header = b"GGUF" + struct.pack("<IQQ", version, tensors, len(entries)) + b"".join(entries) + infos
    padding = b"\0" * (-len(header) % alignment)
    target.write_bytes(header + padding + data)
