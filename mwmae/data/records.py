"""The record schema of the original project, encoded and decoded without TensorFlow.

A record is a serialized ``tf.train.Example`` with two features:

* ``audio``: bytes list of one element, ``tf.io.serialize_tensor`` of a float32 ``[frames, 80]``
  time-major log-mel (a ``TensorProto`` with ``dtype`` DT_FLOAT, a shape and ``tensor_content``);
* ``label``: int64 list (class ids; empty for unlabelled audio).

Files are TFRecord (length + masked CRC32C framing), ZLIB-compressed as one zlib stream over the
whole file, as TensorFlow's ``TFRecordWriter(options="ZLIB")`` writes them; or ArrayRecord,
whose records hold the same serialized Examples.

The protobuf wire format of these three messages is small and frozen, so it is written and
parsed here directly. That keeps TensorFlow (and its gs:// filesystem, which honours no storage
emulator) out of the input pipeline and the shard-building workers; the tests check the bytes
against TensorFlow's own ``serialize_tensor`` / ``parse_single_example`` / ``TFRecordDataset``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Container, Iterator, Sequence
from typing import IO

import google_crc32c
import numpy as np

AUDIO_KEY = "audio"
LABEL_KEY = "label"
_DT_FLOAT = 1  # tensorflow.DataType.DT_FLOAT
_MASK_DELTA = 0xA282EAD8
_READ_CHUNK = 1 << 20


class RecordError(ValueError):
    """A record or file that cannot be decoded; the message names the file and the place."""


# ----------------------------------------------------------------------------- protobuf wire


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    # Length-delimited field (wire type 2).
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _read_varint(buf: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    end = len(buf) if end is None else end
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise RecordError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise RecordError("varint longer than 10 bytes")


def _fields(buf: bytes, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """The fields of the message ``buf[pos:end]`` as ``(number, wire type, a, b)``: for a varint
    ``a`` is its value; for a length-delimited field ``buf[a:b]`` is its payload. Unknown
    fields pass through.

    Offsets into one buffer, not views or copies, and one-byte varints (nearly all keys and
    lengths here but the audio's) read inline: this runs once per clip, on the input path.
    """
    out = []
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0 or wire == 2:
            if pos >= end:
                raise RecordError("truncated varint")
            value = buf[pos]
            if value < 0x80:
                pos += 1
            else:
                value, pos = _read_varint(buf, pos, end)
            if wire == 0:
                out.append((number, 0, value, 0))
                continue
            if pos + value > end:
                raise RecordError("length-delimited field runs past the end of its message")
            out.append((number, 2, pos, pos + value))
            pos += value
            continue
        if wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise RecordError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise RecordError("field runs past the end of its message")
    return out


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _floats(buf: bytes, start: int, end: int) -> np.ndarray:
    """Little-endian float32 values of ``buf[start:end]``, a read-only view (no copy)."""
    if (end - start) % 4:
        raise RecordError(f"float payload of {end - start} bytes is not a whole number of floats")
    return np.frombuffer(buf, "<f4", count=(end - start) // 4, offset=start)


# ----------------------------------------------------------------------------- tensor + example


def serialize_tensor(array: np.ndarray) -> bytes:
    """Bytes equal to ``tf.io.serialize_tensor`` of a float32 array."""
    array = np.ascontiguousarray(array, dtype="<f4")
    dims = b"".join(_field(2, _varint(8) + _varint(d) if d else b"") for d in array.shape)
    out = _varint(1 << 3 | 0) + _varint(_DT_FLOAT) + _field(2, dims)
    if array.size:
        out += _field(4, array.tobytes())
    return out


def _parse_tensor(buf: bytes, start: int, end: int) -> np.ndarray:
    dtype = 0
    shape: list[int] = []
    content: np.ndarray | None = None
    float_val: list[np.ndarray] = []
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dtype = a
        elif number == 2 and wire == 2:
            for dim_number, dim_wire, da, db in _fields(buf, a, b):
                if dim_number == 2 and dim_wire == 2:
                    size = 0
                    for n, w, v, _ in _fields(buf, da, db):
                        if n == 1 and w == 0:
                            size = _signed64(v)
                    shape.append(size)
        elif number == 4 and wire == 2:
            content = _floats(buf, a, b)
        elif number == 5 and wire == 2:  # packed float_val, written by some older producers
            float_val.append(_floats(buf, a, b))
    if dtype != _DT_FLOAT:
        raise RecordError(f"audio tensor has dtype enum {dtype}, expected DT_FLOAT (1)")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        flat = content
    elif float_val:
        flat = np.concatenate(float_val).astype(np.float32)
        if flat.size == 1:
            flat = np.full(count, flat[0], np.float32)
    else:
        flat = np.zeros(0, np.float32)
    if flat.size != count:
        raise RecordError(f"audio tensor holds {flat.size} values for shape {shape}")
    return flat.reshape(shape).astype(np.float32, copy=False)


def _as_bytes(data: bytes | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def parse_tensor(data: bytes | memoryview) -> np.ndarray:
    """Inverse of :func:`serialize_tensor` (float32 ``TensorProto`` with ``tensor_content``).

    The array is a read-only view of ``data`` when it holds ``tensor_content``.
    """
    buf = _as_bytes(data)
    return _parse_tensor(buf, 0, len(buf))


def encode_example(audio: np.ndarray, labels: Sequence[int] = ()) -> bytes:
    """A serialized ``tf.train.Example`` in the original schema."""
    audio_feature = _field(1, _field(1, serialize_tensor(audio)))  # Feature.bytes_list
    packed = b"".join(_varint(int(v)) for v in labels)
    label_feature = _field(3, _field(1, packed) if packed else b"")  # Feature.int64_list
    entries = _field(1, _field(1, AUDIO_KEY.encode()) + _field(2, audio_feature))
    entries += _field(1, _field(1, LABEL_KEY.encode()) + _field(2, label_feature))
    return _field(1, entries)


def _parse_feature(buf: bytes, start: int, end: int) -> tuple[str, list]:
    """``(kind, values)`` of a ``Feature``; bytes values as ``(start, end)`` offsets."""
    for number, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == 1:
            return "bytes", [(va, vb) for n, w, va, vb in _fields(buf, a, b) if n == 1 and w == 2]
        if number == 3:
            ints: list[int] = []
            for n, w, va, vb in _fields(buf, a, b):
                if n != 1:
                    continue
                if w == 0:  # unpacked element
                    ints.append(_signed64(va))
                elif w == 2:  # packed run
                    pos = va
                    while pos < vb:
                        item, pos = _read_varint(buf, pos, vb)
                        ints.append(_signed64(item))
            return "int64", ints
        if number == 2:
            floats = [_floats(buf, va, vb) for n, w, va, vb in _fields(buf, a, b) if w == 2]
            return "float", np.concatenate(floats).tolist() if floats else []
    return "empty", []


def decode_example(data: bytes | memoryview) -> tuple[np.ndarray, np.ndarray]:
    """``(audio float32 [frames, 80], labels int64 [n])`` from a serialized Example.

    The audio is a read-only view of the record's bytes. Raises :class:`RecordError` when the
    record is not in the schema.
    """
    buf = _as_bytes(data)
    features: dict[str, tuple[str, list]] = {}
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number != 1 or wire != 2:
            continue
        for entry_number, entry_wire, ea, eb in _fields(buf, a, b):
            if entry_number != 1 or entry_wire != 2:
                continue
            key, fa, fb = "", 0, 0
            for n, w, va, vb in _fields(buf, ea, eb):
                if n == 1 and w == 2:
                    key = buf[va:vb].decode("utf-8", "replace")
                elif n == 2 and w == 2:
                    fa, fb = va, vb
            features[key] = _parse_feature(buf, fa, fb)
    if AUDIO_KEY not in features:
        raise RecordError(f"record has no '{AUDIO_KEY}' feature (found {sorted(features)})")
    kind, values = features[AUDIO_KEY]
    if kind != "bytes" or len(values) != 1:
        raise RecordError(f"'{AUDIO_KEY}' must be one serialized tensor, got {kind} x{len(values)}")
    audio = _parse_tensor(buf, *values[0])
    if audio.ndim != 2:
        raise RecordError(f"'{AUDIO_KEY}' tensor has shape {audio.shape}, expected [frames, mels]")
    kind, values = features.get(LABEL_KEY, ("empty", []))
    if kind not in ("int64", "empty"):
        raise RecordError(f"'{LABEL_KEY}' must be an int64 list, got {kind}")
    return audio, np.asarray(values, dtype=np.int64)


# ----------------------------------------------------------------------------- TFRecord framing


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(record: bytes) -> bytes:
    """One TFRecord frame: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(record))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + record
        + struct.pack("<I", _masked_crc(record))
    )


class TFRecordWriter:
    """Writes TFRecord frames to a binary file object, ZLIB-compressed by default."""

    def __init__(self, fileobj: IO[bytes], compression: str | None = "zlib", level: int = 6):
        self._file = fileobj
        if compression not in (None, "", "none", "zlib"):
            raise ValueError(f"compression must be 'zlib' or None, got {compression!r}")
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 15) if compression == "zlib" else None
        self.count = 0

    def write(self, record: bytes) -> None:
        frame = frame_record(record)
        self._file.write(self._zlib.compress(frame) if self._zlib else frame)
        self.count += 1

    def close(self) -> None:
        """Finishes the zlib stream; the caller closes the file object."""
        if self._zlib is not None:
            self._file.write(self._zlib.flush())
            self._zlib = None


class _ByteStream:
    """Exact-length reads from a (possibly zlib-compressed) binary stream, chunk by chunk.

    The decompressed stream is held as immutable pieces: a read inside the current piece is a
    single slice (one copy), and only a read that crosses into the next piece joins the rest
    of this one with it.
    """

    def __init__(self, fileobj: IO[bytes], compression: str | None, name: str):
        self._file = fileobj
        self._name = name
        self._zlib = zlib.decompressobj(15) if compression == "zlib" else None
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _more(self) -> bytes:
        """The next piece of the (decompressed) stream; b"" at its end."""
        while True:
            chunk = self._file.read(_READ_CHUNK)
            if not chunk:
                self._eof = True
                if self._zlib is not None and not self._zlib.eof:
                    # A finished writer always ends the stream; a missing end means the file
                    # was cut short (an interrupted copy or write).
                    raise RecordError(f"{self._name}: zlib stream is truncated")
                return b""
            if self._zlib is None:
                return chunk
            try:
                piece = self._zlib.decompress(chunk)
                # Concatenated zlib streams (appended files) continue as a new stream.
                while self._zlib.eof and self._zlib.unused_data:
                    rest = self._zlib.unused_data
                    self._zlib = zlib.decompressobj(15)
                    piece += self._zlib.decompress(rest)
            except zlib.error as e:
                raise RecordError(f"{self._name}: corrupt zlib data ({e})") from e
            if piece:
                return piece

    def _fill(self, need: int) -> None:
        have = len(self._buf) - self._pos
        pieces = [self._buf[self._pos :]] if have else []
        while have < need and not self._eof:
            piece = self._more()
            pieces.append(piece)
            have += len(piece)
        self._buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pos = 0

    def discard(self, n: int) -> bool:
        """Passes over ``n`` bytes without keeping them (no join, no copy); False when the
        stream ends first."""
        have = len(self._buf) - self._pos
        while have < n:
            n -= have
            self._buf, self._pos = b"", 0
            if self._eof:
                return False
            self._buf = self._more()
            have = len(self._buf)
        self._pos += n
        return True

    def read(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, or None at a clean end of stream."""
        if n == 0:
            return b""
        if len(self._buf) - self._pos < n:
            self._fill(n)
        pos = self._pos
        available = len(self._buf) - pos
        if available == 0 and self._eof:
            return None
        if available < n:
            raise RecordError(
                f"{self._name}: file ends inside a record ({available} of {n} bytes present)"
            )
        self._pos = pos + n
        return self._buf[pos : pos + n]


def check_first_header(fileobj: IO[bytes], *, compression: str | None = "zlib",
                       name: str = "<stream>", limit: int = 1 << 16,
                       chunk: int = 4096) -> bool:
    """Whether the stream holds a first record (False: it is empty), reading no more than
    ``limit`` bytes of it, ``chunk`` at a time: the length header and its CRC are checked,
    nothing after them. Raises :class:`RecordError` naming ``name`` for a header that is
    damaged, a zlib stream that is corrupt or ends before the header."""
    inflate = zlib.decompressobj(15) if compression == "zlib" else None
    header, read = b"", 0
    while len(header) < 12 and read < limit:
        data = fileobj.read(min(chunk, limit - read))
        if not data:
            break
        read += len(data)
        if inflate is None:
            header += data
            continue
        try:
            header += inflate.decompress(data, 12 - len(header))
            while len(header) < 12 and inflate.unconsumed_tail:
                header += inflate.decompress(inflate.unconsumed_tail, 12 - len(header))
        except zlib.error as e:
            raise RecordError(f"{name}: corrupt zlib data ({e})") from e
        if inflate.eof and len(header) < 12:
            break
    if len(header) >= 12:
        length_crc = struct.unpack("<I", header[8:12])[0]
        if _masked_crc(header[:8]) != length_crc:
            raise RecordError(f"{name}: record 0: corrupt length header (CRC mismatch)")
        return True
    if read >= limit:  # a header this far in is no sign of damage; the reader will tell
        return True
    if inflate is not None and not inflate.eof:  # as the reader says it (an empty file too)
        raise RecordError(f"{name}: zlib stream is truncated")
    if not header:
        return False
    raise RecordError(f"{name}: file ends inside a record ({len(header)} of 12 bytes present)")


def iter_tfrecord(
    fileobj: IO[bytes],
    *,
    compression: str | None = "zlib",
    name: str = "<stream>",
    verify_crc: bool = True,
    skip: int = 0,
    passing: Container[int] = (),
) -> Iterator[bytes | None]:
    """Yields the records of a TFRecord stream; :class:`RecordError` names ``name`` on damage.

    ``skip`` records are read past first without CRC checks (resuming mid-file). For a record
    in ``passing`` (one already known to be unusable) None is yielded in its place, and its
    bytes are passed over unchecked and never assembled: a damaged long clip costs its
    decompression, not a copy, a CRC and a decode, each time it comes round again.
    """
    stream = _ByteStream(fileobj, compression, name)
    index = 0
    while True:
        header = stream.read(12)
        if header is None:
            return
        length, length_crc = struct.unpack("<QI", header)
        if verify_crc and _masked_crc(header[:8]) != length_crc:
            raise RecordError(f"{name}: record {index}: corrupt length header (CRC mismatch)")
        if index in passing and index >= skip:
            if not stream.discard(length + 4):
                raise RecordError(f"{name}: record {index}: file ends after the length header")
            yield None
            index += 1
            continue
        data = stream.read(length)
        footer = stream.read(4) if data is not None else None
        if data is None or footer is None:
            raise RecordError(f"{name}: record {index}: file ends after the length header")
        if index >= skip:
            (data_crc,) = struct.unpack("<I", footer)
            if verify_crc and _masked_crc(data) != data_crc:
                raise RecordError(f"{name}: record {index}: corrupt data (CRC mismatch)")
            yield data
        index += 1
