"""TFRecord files of ImageNet `tf.train.Example`s, written and read without TensorFlow.

Spark executors that only resize images must not pay TensorFlow's import time and memory, so the
protobuf wire format and the TFRecord framing are encoded here by hand. Files written here are
read unchanged by `tf.data.TFRecordDataset` + `tf.io.parse_single_example` (the tests prove it).

Framing of one record: uint64 LE length, uint32 LE masked CRC32C of those 8 bytes, the data,
uint32 LE masked CRC32C of the data.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import crc32c

from etl.records import ImageRow

# A record larger than this is treated as corruption: ImageNet JPEGs are well under a few MB, and
# the bound stops a corrupt length that happens to pass the CRC from allocating gigabytes.
MAX_RECORD_BYTES = 256 * 1024 * 1024

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF

# protobuf wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class CorruptRecordError(ValueError):
    """A TFRecord file whose framing or checksums are wrong; names the file and byte offset."""


class ProtoDecodeError(ValueError):
    """Bytes that are not a well-formed tf.train.Example."""


def masked_crc32c(data: bytes) -> int:
    # TFRecord masks CRCs so that a CRC stored inside CRC'd data does not weaken the check.
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


# ---------------------------------------------------------------------------------------------
# protobuf encoding

def _varint(value: int) -> bytes:
    if value < 0:  # int64 negatives are encoded as their 64-bit two's complement (10 bytes)
        value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | _LEN) + _varint(len(payload)) + payload


def _bytes_feature(values: list[bytes]) -> bytes:
    # Feature.bytes_list = 1; BytesList.value = 1 (repeated bytes)
    inner = b"".join(_len_field(1, v) for v in values)
    return _len_field(1, inner)


def _int64_feature(values: list[int]) -> bytes:
    # Feature.int64_list = 3; Int64List.value = 1 [packed]
    inner = _len_field(1, b"".join(_varint(v) for v in values)) if values else b""
    return _len_field(3, inner)


def encode_features(features: dict[str, bytes]) -> bytes:
    """Example{features: Features{feature: map<string, Feature>}} from pre-encoded Features.

    Map entries are written in sorted key order, as protobuf's deterministic serialization does,
    so the same row always gives the same bytes (and the same shard sha256 on a retried task).
    """
    entries = b"".join(
        _len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, features[key]))
        for key in sorted(features)
    )
    return _len_field(1, entries)


def _text(value: str) -> bytes:
    return value.encode("utf-8")


def encode_example(row: ImageRow, label_offset: int = 1) -> bytes:
    """A serialized tf.train.Example in the schema of TensorFlow's build_imagenet_data.py."""
    if row.label < 0:
        raise ValueError(f"row {row.key!r}: label {row.label} is negative")
    return encode_features({
        "image/height": _int64_feature([row.height]),
        "image/width": _int64_feature([row.width]),
        "image/colorspace": _bytes_feature([b"RGB"]),
        "image/channels": _int64_feature([3]),
        "image/class/label": _int64_feature([row.label + label_offset]),
        "image/class/synset": _bytes_feature([_text(row.synset)]),
        "image/class/text": _bytes_feature([_text(row.class_text)]),
        "image/format": _bytes_feature([b"JPEG"]),
        "image/filename": _bytes_feature([_text(row.filename)]),
        "image/encoded": _bytes_feature([row.jpeg]),
    })


# ---------------------------------------------------------------------------------------------
# protobuf decoding (only what an Example needs; unknown fields are skipped as protobuf does)

def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoDecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtoDecodeError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a message; LEN values are memoryviews."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ProtoDecodeError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _I64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _I32:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ProtoDecodeError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ProtoDecodeError("field runs past the end of the message")
        yield field, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_list(kind: int, buf: memoryview) -> list:
    out: list = []
    for field, wire, value in _fields(buf):
        if field != 1:
            continue
        if kind == 1:  # BytesList
            if wire != _LEN:
                raise ProtoDecodeError("BytesList value is not length-delimited")
            out.append(bytes(value))
        elif kind == 2:  # FloatList: packed or not
            if wire == _LEN:
                if len(value) % 4:
                    raise ProtoDecodeError("packed FloatList length is not a multiple of 4")
                out.extend(struct.unpack(f"<{len(value) // 4}f", value))
            elif wire == _I32:
                out.append(struct.unpack("<f", value)[0])
            else:
                raise ProtoDecodeError("bad FloatList wire type")
        else:  # Int64List: packed or not
            if wire == _LEN:
                pos = 0
                while pos < len(value):
                    v, pos = _read_varint(value, pos)
                    out.append(_signed64(v))
            elif wire == _VARINT:
                out.append(_signed64(value))
            else:
                raise ProtoDecodeError("bad Int64List wire type")
    return out


def decode_example(data: bytes) -> dict[str, list]:
    """Feature name -> list of values (bytes, float or int) of a serialized tf.train.Example."""
    result: dict[str, list] = {}
    for field, wire, features in _fields(memoryview(data)):
        if field != 1 or wire != _LEN:
            continue
        for f_field, f_wire, entry in _fields(features):
            if f_field != 1 or f_wire != _LEN:
                continue
            key, values = "", []
            for e_field, e_wire, e_value in _fields(entry):
                if e_field == 1 and e_wire == _LEN:
                    try:
                        key = bytes(e_value).decode("utf-8")
                    except UnicodeDecodeError:
                        raise ProtoDecodeError("feature name is not UTF-8") from None
                elif e_field == 2 and e_wire == _LEN:
                    values = []
                    for kind, k_wire, k_value in _fields(e_value):
                        if kind in (1, 2, 3) and k_wire == _LEN:
                            values = _decode_list(kind, k_value)
            result[key] = values  # the last entry of a repeated map key wins, as in protobuf
    return result


# ---------------------------------------------------------------------------------------------
# framing

class TFRecordWriter:
    """Appends framed records to an open binary file object (the caller owns and closes it)."""

    def __init__(self, fileobj: BinaryIO):
        self._fh = fileobj
        self.records = 0

    def write(self, record: bytes) -> None:
        if len(record) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(record)} bytes exceeds {MAX_RECORD_BYTES}")
        header = struct.pack("<Q", len(record))
        self._fh.write(header + struct.pack("<I", masked_crc32c(header)))
        self._fh.write(record)
        self._fh.write(struct.pack("<I", masked_crc32c(record)))
        self.records += 1


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = fh.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def iter_records(source: BinaryIO | str | os.PathLike,
                 max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[bytes]:
    """Every record's data, with both CRCs checked; CorruptRecordError names file and offset."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            yield from _iter_framed(fh, str(Path(source)), max_record_bytes)
    else:
        yield from _iter_framed(source, getattr(source, "name", "<stream>"), max_record_bytes)


def _iter_framed(fh: BinaryIO, name: str, max_record_bytes: int) -> Iterator[bytes]:
    offset = 0
    index = 0
    while True:
        header = _read_exact(fh, 12)
        if not header:
            return
        where = f"{name}: record {index} at byte offset {offset}"
        if len(header) < 12:
            raise CorruptRecordError(f"{where}: truncated header ({len(header)} of 12 bytes)")
        (length,) = struct.unpack("<Q", header[:8])
        (length_crc,) = struct.unpack("<I", header[8:])
        if masked_crc32c(header[:8]) != length_crc:
            raise CorruptRecordError(f"{where}: length CRC mismatch")
        if length > max_record_bytes:
            raise CorruptRecordError(f"{where}: length {length} exceeds {max_record_bytes}")
        body = _read_exact(fh, length + 4)
        if len(body) < length + 4:
            raise CorruptRecordError(
                f"{where}: truncated record ({len(body)} of {length + 4} bytes after the header)")
        data = body[:length]
        (data_crc,) = struct.unpack("<I", body[length:])
        if masked_crc32c(data) != data_crc:
            raise CorruptRecordError(f"{where}: data CRC mismatch")
        yield data
        offset += 12 + length + 4
        index += 1
