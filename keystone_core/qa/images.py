"""Decoding image messages (ROS 2 CDR) completely, so a damaged frame cannot pass.

``sensor_msgs/msg/CompressedImage`` payloads are parsed straight from CDR (no dynamic
message decoding) and the image inside is decoded to the last byte: JPEGs with
libjpeg-turbo in strict mode (every "corrupt data" warning is an error — a truncated or
damaged entropy stream fails even when a lenient decoder would draw a grey block),
anything else with Pillow's ``load()`` (``verify()`` never decodes pixel data).
JPEGs are decoded at 1/8 scale: the entropy stream, where damage shows, is still decoded
in full, while the inverse DCT — most of the cost — shrinks 64x.
``sensor_msgs/msg/Image`` (raw) frames are checked for a data length of height x step.
"""

from __future__ import annotations

import io
import struct

import simplejpeg
from PIL import Image

COMPRESSED = "compressed"
RAW = "raw"


def image_kind(schema_name: str) -> str | None:
    """``compressed``/``raw`` for the ROS image message types, else None."""
    name = schema_name.replace("/msg/", "/")
    if name == "sensor_msgs/CompressedImage":
        return COMPRESSED
    if name == "sensor_msgs/Image":
        return RAW
    return None


class _Cdr:
    """Just enough of a CDR reader for the two image messages."""

    def __init__(self, payload: bytes) -> None:
        if len(payload) < 4:
            raise ValueError(f"message of {len(payload)} bytes has no CDR header")
        self.little = payload[1] in (0x01, 0x03)
        self.data = memoryview(payload)[4:]
        self.pos = 0

    def _align(self, size: int) -> None:
        self.pos += (-self.pos) % size

    def u32(self) -> int:
        self._align(4)
        if self.pos + 4 > len(self.data):
            raise ValueError("message ends inside a field")
        (value,) = struct.unpack_from("<I" if self.little else ">I", self.data, self.pos)
        self.pos += 4
        return int(value)

    def u8(self) -> int:
        if self.pos + 1 > len(self.data):
            raise ValueError("message ends inside a field")
        self.pos += 1
        return int(self.data[self.pos - 1])

    def blob(self) -> memoryview:
        length = self.u32()
        if self.pos + length > len(self.data):
            raise ValueError(f"field of {length} bytes runs past the message")
        out = self.data[self.pos : self.pos + length]
        self.pos += length
        return out

    def text(self) -> str:
        return bytes(self.blob()).rstrip(b"\0").decode("utf-8", "replace")

    def header(self) -> None:
        self.u32()  # stamp.sec
        self.u32()  # stamp.nanosec
        self.blob()  # frame_id


def check_frame(kind: str, payload: bytes) -> str | None:
    """Why this image message is not a complete, decodable frame (None when it is)."""
    try:
        cdr = _Cdr(payload)
        cdr.header()
        if kind == RAW:
            height, width = cdr.u32(), cdr.u32()
            cdr.text()  # encoding
            cdr.u8()  # is_bigendian
            step = cdr.u32()
            data = cdr.blob()
            if not data:
                return "empty frame (0 bytes of image data)"
            if step < width or len(data) != height * step:
                return f"raw frame has {len(data)} bytes, expected {height}x{step}"
            return None
        fmt = cdr.text().lower()
        image = bytes(cdr.blob())
    except ValueError as exc:
        return f"not a well-formed image message: {exc}"
    if not image:
        return "empty frame (0 bytes of image data)"
    try:
        if "jpeg" in fmt or "jpg" in fmt or image[:2] == b"\xff\xd8":
            simplejpeg.decode_jpeg(image, strict=True, min_height=1, min_width=1)
        else:
            with Image.open(io.BytesIO(image)) as picture:
                picture.load()
    except Exception as exc:  # every decoder error means "this frame is damaged"
        return f"{fmt or 'image'} frame does not decode: {exc}"[:300]
    return None
