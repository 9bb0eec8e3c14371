"""Previews of an assessed episode for the person who inspects it: two images.

* **Contact sheet** (JPEG, Pillow): one row per camera topic, ``COLUMNS`` frames at the
  same instants spread from the first to the last message of the recording, each tile
  labelled with its topic and time. Frames come from the chunks holding those instants —
  read one chunk at a time, JPEGs decoded at the smallest DCT scale that covers a tile —
  so memory stays at one chunk plus the tiles whatever the file's size. A damaged frame
  is drawn as far as a lenient decoder gets and outlined in red with the reason.
* **Message-rate timeline** (PNG, matplotlib): one row per topic, messages/s over the
  recording from the index log times, every silence ``message_gaps`` holds against the
  topic shaded red and labelled; required topics that are absent get a row saying so.

``render_previews`` never raises: what cannot be drawn (no camera topic, an unreadable
file, a chunk that does not open) is skipped and said in ``Previews.notes``.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from keystone_core.qa.checks import QAConfig, Silence, silences
from keystone_core.qa.images import Thumbnail, frame_thumbnail, image_kind
from keystone_core.qa.inventory import ChunkRef, Inventory, Limits, chunk_messages
from keystone_core.qa.source import Source

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONTACT_SHEET = "contact_sheet.jpg"
RATE_TIMELINE = "rate_timeline.png"
COLUMNS = 6
TILE_WIDTH, TILE_HEIGHT = 240, 180
LABEL_HEIGHT = 16
HEADER_HEIGHT = 22
MAX_CAMERAS = 8
MAX_TIMELINE_ROWS = 32
# Reading the sheet's chunks stops after this long (what was drawn by then is kept).
FRAME_SECONDS = 60.0
JPEG_QUALITY = 80
BACKGROUND = (24, 24, 24)
RED = (220, 40, 40)

# matplotlib does not promise thread safety, and QA scores several episodes at once.
_MATPLOTLIB = threading.Lock()


@dataclass
class Previews:
    """The rendered images (None when not drawn: the reason is in ``notes``)."""

    contact_sheet: bytes | None = None
    rate_timeline: bytes | None = None
    silences: list[Silence] = field(default_factory=list)
    tiles: int = 0  # frames drawn on the sheet
    damaged_tiles: int = 0  # of those and the cells left empty: with a problem shown
    chunks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def render_previews(
    source: Source,
    inventory: Inventory | None,
    config: QAConfig | None = None,
    *,
    title: str = "",
    required_topics: Sequence[str] = (),
    limits: Limits | None = None,
) -> Previews:
    """Both previews of one episode, as far as they can be drawn (see the module doc)."""
    started = time.monotonic()
    out = Previews()
    if inventory is None:
        out.notes.append("no preview: the file could not be read")
        return out
    config = config or QAConfig()
    limits = limits or Limits()
    read_before = source.bytes_read
    try:
        out.contact_sheet = _contact_sheet(source, inventory, limits, title, out)
    except Exception as exc:  # a preview never fails QA
        out.notes.append(f"contact sheet not drawn: {exc}"[:300])
    try:
        out.silences = silences(inventory, config)
        with _MATPLOTLIB:
            figure = rate_timeline_figure(
                inventory, out.silences, required_topics=required_topics, title=title
            )
            out.rate_timeline = _png(figure)
    except Exception as exc:  # a preview never fails QA
        out.notes.append(f"rate timeline not drawn: {exc}"[:300])
    out.bytes_read = source.bytes_read - read_before
    out.seconds = round(time.monotonic() - started, 4)
    return out


# --- contact sheet ---------------------------------------------------------------------------


@dataclass
class _Cell:
    channel_id: int
    log_time: int
    thumbnail: Thumbnail | None = None


def _cameras(inventory: Inventory) -> list[tuple[int, str, str]]:
    """(channel, topic, kind) of every image channel, by topic."""
    found = []
    for cid, info in inventory.channels.items():
        kind = image_kind(inventory.schema_of(cid))
        if kind:
            found.append((cid, info.topic, kind))
    return sorted(found, key=lambda c: (c[1], c[0]))


def _column_times(start: int, end: int) -> list[int]:
    if end <= start:
        return [start]
    return [int(t) for t in np.linspace(start, end, COLUMNS)]


def _nearest(times: np.ndarray, moment: int) -> int:
    at = int(np.searchsorted(times, moment))
    candidates = [i for i in (at - 1, at) if 0 <= i < len(times)]
    return int(min((times[i] for i in candidates), key=lambda t: abs(int(t) - moment)))


def _chunk_of(inventory: Inventory, channel_id: int, log_time: int) -> ChunkRef | None:
    for ref in inventory.chunks:
        if (
            channel_id in ref.channels
            and ref.start_ns is not None
            and ref.end_ns is not None
            and ref.start_ns <= log_time <= ref.end_ns
        ):
            return ref
    return None


def _contact_sheet(
    source: Source, inventory: Inventory, limits: Limits, title: str, out: Previews
) -> bytes | None:
    cameras = _cameras(inventory)
    if not cameras:
        out.notes.append("no contact sheet: no image topics")
        return None
    if len(cameras) > MAX_CAMERAS:
        out.notes.append(f"contact sheet shows the first {MAX_CAMERAS} of {len(cameras)} cameras")
        cameras = cameras[:MAX_CAMERAS]
    kinds = {cid: kind for cid, _, kind in cameras}
    rows: list[list[_Cell]] = []
    if inventory.start_ns is not None and inventory.end_ns is not None:
        columns = _column_times(inventory.start_ns, inventory.end_ns)
        for cid, _, _ in cameras:
            times = np.frombuffer(inventory.times.get(cid, b""), dtype=np.int64)
            rows.append([_Cell(cid, _nearest(times, t)) for t in columns] if len(times) else [])
    else:
        rows = [[] for _ in cameras]
    _draw_cells(source, inventory, limits, kinds, rows, out)
    out.damaged_tiles = sum(
        1 for row in rows for cell in row if cell.thumbnail is None or cell.thumbnail.problem
    )
    return _compose(inventory, cameras, rows, title)


def _draw_cells(
    source: Source,
    inventory: Inventory,
    limits: Limits,
    kinds: dict[int, str],
    rows: list[list[_Cell]],
    out: Previews,
) -> None:
    """Decode each cell's frame, reading every chunk involved once, one at a time."""
    wanted: dict[int, tuple[ChunkRef, dict[tuple[int, int], list[_Cell]]]] = {}
    for cell in (c for row in rows for c in row):
        ref = _chunk_of(inventory, cell.channel_id, cell.log_time)
        if ref is None:
            cell.thumbnail = Thumbnail(None, "frame not located in any chunk")
            continue
        cells = wanted.setdefault(ref.offset, (ref, {}))[1]
        cells.setdefault((cell.channel_id, cell.log_time), []).append(cell)
    deadline = time.monotonic() + min(FRAME_SECONDS, limits.seconds)
    for _offset, (ref, cells) in sorted(wanted.items()):
        if time.monotonic() > deadline:
            out.notes.append(f"contact sheet: frame reading stopped after {FRAME_SECONDS:.0f} s")
            break
        if ref.length > limits.max_chunk_bytes:
            _fail(cells, f"chunk at offset {ref.offset} is over the size limit")
            continue
        record = b""
        try:
            record = source.read_at(ref.offset, ref.length)
            out.chunks_read += 1
            for channel_id, log_time, payload in chunk_messages(record, limits):
                targets = cells.pop((channel_id, log_time), None)
                if targets is None:
                    continue
                thumbnail = frame_thumbnail(
                    kinds[channel_id], bytes(payload), TILE_WIDTH, TILE_HEIGHT
                )
                out.tiles += thumbnail.image is not None
                for cell in targets:
                    cell.thumbnail = thumbnail
                if not cells:
                    break
        except Exception as exc:  # a chunk that does not open: its cells say so
            _fail(cells, f"chunk at offset {ref.offset} unreadable: {exc}"[:200])
        del record
        _fail(cells, "frame not found in its chunk")


def _fail(cells: dict[tuple[int, int], list[_Cell]], reason: str) -> None:
    for targets in cells.values():
        for cell in targets:
            if cell.thumbnail is None:
                cell.thumbnail = Thumbnail(None, reason)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size)
    except Exception:  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _compose(
    inventory: Inventory,
    cameras: list[tuple[int, str, str]],
    rows: list[list[_Cell]],
    title: str,
) -> bytes:
    row_height = TILE_HEIGHT + LABEL_HEIGHT
    sheet = Image.new(
        "RGB", (COLUMNS * TILE_WIDTH, HEADER_HEIGHT + len(cameras) * row_height), BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    small, large = _font(11), _font(14)
    draw.text((6, 4), title or "contact sheet", fill=(235, 235, 235), font=large)
    start = inventory.start_ns or 0
    for r, ((_cid, topic, _kind), row) in enumerate(zip(cameras, rows, strict=True)):
        top = HEADER_HEIGHT + r * row_height
        if not row:
            draw.text((8, top + 8), f"{topic}: no messages", fill=RED, font=large)
            continue
        for c, cell in enumerate(row):
            left = c * TILE_WIDTH
            thumbnail = cell.thumbnail or Thumbnail(None, "not drawn")
            if thumbnail.image is not None:
                image = thumbnail.image.convert("RGB")
                sheet.paste(
                    image,
                    (
                        left + (TILE_WIDTH - image.width) // 2,
                        top + (TILE_HEIGHT - image.height) // 2,
                    ),
                )
            if thumbnail.problem:
                draw.rectangle(
                    (left + 1, top + 1, left + TILE_WIDTH - 2, top + TILE_HEIGHT - 2),
                    outline=RED,
                    width=3,
                )
                draw.text(
                    (left + 8, top + 8),
                    _wrap(thumbnail.problem, 34),
                    fill=RED,
                    font=small,
                    stroke_width=2,
                    stroke_fill=(0, 0, 0),
                )
            label = f"{topic}  +{(cell.log_time - start) / 1e9:.2f} s"
            grey = (200, 200, 200)
            draw.text((left + 4, top + TILE_HEIGHT + 2), _clip(label, 40), fill=grey, font=small)
    out = io.BytesIO()
    sheet.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrap(text: str, width: int, lines: int = 4) -> str:
    words, out, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    out.append(line)
    return "\n".join(_clip(x, width) for x in out[:lines])


# --- message-rate timeline -------------------------------------------------------------------


def rate_timeline_figure(
    inventory: Inventory,
    found: Sequence[Silence],
    *,
    required_topics: Sequence[str] = (),
    title: str = "",
) -> Figure:
    """One row per topic: messages/s over the recording, silences shaded red. Silences are
    ``axvspan`` patches with ``gid`` ``silence:<topic>`` and a text label each."""
    from matplotlib.figure import Figure

    start = inventory.start_ns
    end = inventory.end_ns
    span_s = (end - start) / 1e9 if start is not None and end is not None else 0.0
    channels = sorted(inventory.channels.items(), key=lambda c: (c[1].topic, c[0]))
    present = {info.topic for _, info in channels}
    rows: list[tuple[str, int | None]] = [(info.topic, cid) for cid, info in channels]
    rows += [(topic, None) for topic in required_topics if topic not in present]
    hidden = max(0, len(rows) - MAX_TIMELINE_ROWS)
    rows = rows[:MAX_TIMELINE_ROWS] or [("(no topics)", None)]
    height = 0.8 * len(rows) + 1.1  # inches: a row each, the title and the time axis
    figure = Figure(figsize=(11, height), dpi=100)
    axes = figure.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    bins = int(min(300, max(10, span_s / 0.5)))
    edges = np.linspace(0.0, max(span_s, 1e-3), bins + 1)
    for ax, (topic, cid) in zip(axes, rows, strict=True):
        ax.set_ylabel(_clip(topic, 40), rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        raw = inventory.times.get(cid) if cid is not None else None
        times = np.frombuffer(raw, dtype=np.int64) if raw else np.zeros(0, dtype=np.int64)
        if not len(times) or start is None:
            absent = cid is None
            ax.text(
                0.5,
                0.5,
                "absent (required topic)" if absent else "no messages",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="red",
                fontsize=9,
            )
            ax.set_yticks([])
            continue
        seconds = (times - start) / 1e9
        counts, _ = np.histogram(seconds, bins=edges)
        rates = counts / np.diff(edges)
        ax.stairs(rates, edges, fill=True, alpha=0.55, color="tab:blue")
        top = float(rates.max()) * 1.35 or 1.0
        ax.set_ylim(0, top)
        mean = len(times) / span_s if span_s > 0 else float(len(times))
        ax.text(
            1.005,
            0.5,
            f"{len(times)} msgs\n{mean:.1f}/s",
            transform=ax.transAxes,
            fontsize=7,
            va="center",
        )
        for silence in (s for s in found if s.channel_id == cid):
            left, right = (silence.start_ns - start) / 1e9, (silence.end_ns - start) / 1e9
            ax.axvspan(left, right, color="red", alpha=0.3, lw=0, gid=f"silence:{topic}")
            ax.text(
                (left + right) / 2,
                top * 0.92,
                f"silent {silence.seconds:.1f} s",
                color="red",
                fontsize=7,
                ha="center",
                va="top",
                gid=f"silence-label:{topic}",
            )
    axes[-1].set_xlim(0, max(span_s, 1e-3))
    axes[-1].set_xlabel("seconds since the recording started", fontsize=8)
    heading = title or "message rate per topic"
    if hidden:
        heading += f" (first {MAX_TIMELINE_ROWS} topics; {hidden} more not shown)"
    figure.suptitle(heading + "  —  messages/s; red: silences QA flagged", fontsize=9)
    figure.subplots_adjust(left=0.24, right=0.92, top=1 - 0.45 / height, bottom=0.55 / height)
    return figure


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # attaches the Agg canvas: no pyplot, no global backend
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
