"""Decoding image messages (ROS 2 CDR) completely, so a damaged frame cannot pass.

``sensor_msgs/msg/CompressedImage`` payloads are parsed straight from CDR (no dynamic
message decoding) and the image inside is decoded to the last byte: JPEGs with
libjpeg-turbo in strict mode (every "corrupt data" warning is an error — a truncated or
damaged entropy stream fails even when a lenient decoder would draw a grey block),
anything else with Pillow's ``load()`` (``verify()`` never decodes pixel data).
JPEGs are decoded at 1/8 scale: the entropy stream, where damage shows, is still decoded
in full, while the inverse DCT — most of the cost — shrinks 64x.
``sensor_msgs/msg/Image`` (raw) frames are checked for a data length of height x step.

``frame_thumbnail`` draws a frame small for the QA previews: JPEGs are decoded at the
smallest DCT scale that still covers the tile, raw frames are strided down before any copy.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class Thumbnail:
    """A frame drawn small. ``problem`` says why it is not a clean frame; a damaged JPEG
    still has an ``image`` when a lenient decode could draw it (what the damage looks like)."""

    image: Image.Image | None
    problem: str | None = None


# Raw encodings drawn: (numpy dtype, channels, PIL mode of the result, channel order).
_RAW = {
    "rgb8": ("u1", 3, "RGB", None),
    "bgr8": ("u1", 3, "RGB", [2, 1, 0]),
    "8uc3": ("u1", 3, "RGB", [2, 1, 0]),
    "rgba8": ("u1", 4, "RGB", [0, 1, 2]),
    "bgra8": ("u1", 4, "RGB", [2, 1, 0]),
    "mono8": ("u1", 1, "L", None),
    "8uc1": ("u1", 1, "L", None),
    "mono16": ("u2", 1, "L", None),
    "16uc1": ("u2", 1, "L", None),
}


def frame_thumbnail(kind: str, payload: bytes, width: int, height: int) -> Thumbnail:
    """The frame of an image message fitted into ``width`` x ``height`` (RGB or L)."""
    try:
        cdr = _Cdr(payload)
        cdr.header()
        if kind == RAW:
            return _raw_thumbnail(cdr, width, height)
        fmt = cdr.text().lower()
        data = bytes(cdr.blob())
    except ValueError as exc:
        return Thumbnail(None, f"not a well-formed image message: {exc}")
    if not data:
        return Thumbnail(None, "empty frame (0 bytes of image data)")
    if "jpeg" in fmt or "jpg" in fmt or data[:2] == b"\xff\xd8":
        return _jpeg_thumbnail(data, width, height)
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.draft("RGB", (width, height))
            picture.load()
            image = picture.convert("RGB")
    except Exception as exc:  # any decoder error: the frame is damaged
        return Thumbnail(None, f"{fmt or 'image'} frame does not decode: {exc}"[:300])
    image.thumbnail((width, height))
    return Thumbnail(image)


def _jpeg_thumbnail(data: bytes, width: int, height: int) -> Thumbnail:
    problem = None
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", strict=True, min_width=width, min_height=height
        )
    except Exception as exc:  # damaged: draw what a lenient decoder makes of it
        problem = f"jpeg frame does not decode: {exc}"[:300]
        try:
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="RGB", strict=False, min_width=width, min_height=height
            )
        except Exception:  # nothing to draw
            return Thumbnail(None, problem)
    image = Image.fromarray(pixels)
    image.thumbnail((width, height))
    return Thumbnail(image, problem)


def _raw_thumbnail(cdr: _Cdr, width: int, height: int) -> Thumbnail:
    rows, columns = cdr.u32(), cdr.u32()
    encoding = cdr.text().lower()
    big_endian = cdr.u8() != 0
    step = cdr.u32()
    data = cdr.blob()
    if not data or not rows or not columns:
        return Thumbnail(None, "empty frame (0 bytes of image data)")
    if step < columns or len(data) != rows * step:
        return Thumbnail(None, f"raw frame has {len(data)} bytes, expected {rows}x{step}")
    layout = _RAW.get(encoding)
    if layout is None:
        return Thumbnail(None, f"raw encoding {encoding!r} is not drawn")
    dtype, channels, mode, order = layout
    item = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
    if step < columns * channels * item.itemsize:
        return Thumbnail(None, f"raw {encoding} frame: step {step} is under its row size")
    # Stride down to about the tile before anything is copied.
    stride = max(1, min(rows // height, columns // width))
    plane = np.frombuffer(data, dtype=np.uint8).reshape(rows, step)[::stride]
    pixels = (
        plane[:, : columns * channels * item.itemsize]
        .copy()
        .view(item)
        .reshape(len(plane), columns, channels)[:, ::stride]
    )
    if item.itemsize == 2:  # 16-bit depth or mono: scale to its own range
        values = pixels.astype(np.float32)
        top = float(values.max()) or 1.0
        pixels = (values * (255.0 / top)).astype(np.uint8)
    if order is not None:
        pixels = pixels[:, :, order]
    image = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if mode == "L" else pixels))
    image.thumbnail((width, height))
    return Thumbnail(image)
