"""Image dimensions from a file's header, read before any pixel is decoded (decompression bombs).

A 0.5 MiB PNG can declare 8000x8000 16-bit pixels; the decoder allocates what the header says.
:func:`header_size` reads the width and height the decoder will allocate for, from the same
bytes OpenCV uses to pick its decoder (the signature at offset 0), for the formats a replay
directory holds: PNG, JPEG, BMP, TIFF/BigTIFF, WebP and PNM/PAM/PFM. Anything else, or a header
that does not parse, is refused: an image whose size cannot be known is not decoded.
"""

from __future__ import annotations

import re
import struct


class HeaderError(ValueError):
    """The header is not one of the known formats, or is malformed / truncated."""


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4/C8/CC are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n\r]*[\n\r])*(\d+)")


def header_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) declared by an encoded image's header; HeaderError if it cannot be read."""
    head = bytes(data[:16])
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(data)
        if head.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if head.startswith(b"BM"):
            return _bmp(data)
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff(data)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(data)
        if head[:1] == b"P" and head[1:2] in b"1234567fF":
            return _pnm(data)
    except (struct.error, IndexError):
        raise HeaderError("truncated image header") from None
    raise HeaderError("not a PNG, JPEG, BMP, TIFF, WebP or PNM image")


def _png(d: bytes | memoryview) -> tuple[int, int]:
    if bytes(d[12:16]) != b"IHDR":
        raise HeaderError("PNG without IHDR")
    w, h = struct.unpack(">II", d[16:24])
    return w, h


def _jpeg(d: bytes | memoryview) -> tuple[int, int]:
    i, n = 2, len(d)
    while i < n:
        if d[i] != 0xFF:
            raise HeaderError("JPEG marker expected")
        while i < n and d[i] == 0xFF:  # fill bytes
            i += 1
        marker = d[i]
        i += 1
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan before any frame header
        (length,) = struct.unpack(">H", d[i : i + 2])
        if marker in _SOF:
            h, w = struct.unpack(">HH", d[i + 3 : i + 7])
            if h == 0:  # height given later by a DNL marker: unknown until decoded
                raise HeaderError("JPEG with its height in a DNL marker")
            return w, h
        if length < 2:
            raise HeaderError("malformed JPEG segment")
        i += length
    raise HeaderError("JPEG without a frame header")


def _bmp(d: bytes | memoryview) -> tuple[int, int]:
    (dib,) = struct.unpack("<I", d[14:18])
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        w, h = struct.unpack("<HH", d[18:22])
        return w, h
    w, h = struct.unpack("<ii", d[18:26])
    return abs(w), abs(h)  # negative height = top-down rows


def _tiff(d: bytes | memoryview) -> tuple[int, int]:
    e = "<" if bytes(d[:2]) == b"II" else ">"
    big = d[2:4] in (b"+\x00", b"\x00+")
    if big:
        (ifd,) = struct.unpack(e + "Q", d[8:16])
        (count,) = struct.unpack(e + "Q", d[ifd : ifd + 8])
        start, size, value_at = ifd + 8, 20, 12
    else:
        (ifd,) = struct.unpack(e + "I", d[4:8])
        (count,) = struct.unpack(e + "H", d[ifd : ifd + 2])
        start, size, value_at = ifd + 2, 12, 8
    dims: dict[int, int] = {}
    for k in range(min(count, 4096)):
        at = start + k * size
        tag, kind = struct.unpack(e + "HH", d[at : at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3), LONG (4) or LONG8 (16)
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                raise HeaderError("TIFF image size of an unexpected type")
            (dims[tag],) = struct.unpack(e + fmt, d[at + value_at : at + value_at + struct.calcsize(fmt)])
    if 256 not in dims or 257 not in dims:
        raise HeaderError("TIFF without ImageWidth / ImageLength")
    return dims[256], dims[257]


def _webp(d: bytes | memoryview) -> tuple[int, int]:
    chunk = bytes(d[12:16])
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        (bits,) = struct.unpack("<I", d[21:25])
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8X":
        w = int.from_bytes(bytes(d[24:27]), "little") + 1
        h = int.from_bytes(bytes(d[27:30]), "little") + 1
        return w, h
    raise HeaderError("WebP without a VP8/VP8L/VP8X chunk")


def _pnm(d: bytes | memoryview) -> tuple[int, int]:
    head = bytes(d[:4096])
    if head[1:2] == b"7":  # PAM: WIDTH / HEIGHT lines
        w = re.search(rb"^WIDTH\s+(\d+)", head, re.M)
        h = re.search(rb"^HEIGHT\s+(\d+)", head, re.M)
        if not (w and h):
            raise HeaderError("PAM without WIDTH / HEIGHT")
        return int(w.group(1)), int(h.group(1))
    m1 = _PNM_TOKEN.match(head, 2)
    m2 = _PNM_TOKEN.match(head, m1.end()) if m1 else None
    if not (m1 and m2):
        raise HeaderError("PNM without width and height")
    return int(m1.group(1)), int(m2.group(1))
