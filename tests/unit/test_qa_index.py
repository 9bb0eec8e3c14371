"""Message indexes give the same timelines and sizes as reading every message."""

from __future__ import annotations

from pathlib import Path

from mcap.reader import make_reader

from keystone_core.qa.index import read_chunk_index, timelines
from keystone_core.simulation.episodes import EpisodeSpec, generate


def test_timelines_and_sizes_match_a_full_read(tmp_path: Path) -> None:
    episode = generate(
        EpisodeSpec(
            task_id="t",
            device_id="d",
            duration_s=8,
            target_bytes=12 * 2**20,
            faults=frozenset({"zero_frames"}),
        ),
        tmp_path,
    )
    with episode.mcap_path.open("rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        assert summary is not None
        assert len(summary.chunk_indexes) > 1
        expected: dict[int, list[int]] = {}
        sizes: dict[tuple[int, int], int] = {}
        for _schema, channel, message in reader.iter_messages():
            expected.setdefault(channel.id, []).append(message.log_time)
            sizes[(channel.id, message.log_time)] = len(message.data)
        got = timelines(f, summary.chunk_indexes)
        assert got == {k: sorted(v) for k, v in expected.items()}
        indexed = [m for c in summary.chunk_indexes for m in read_chunk_index(f, c)]
    known = [m for m in indexed if m.size is not None]
    assert known
    assert all(sizes[(m.channel_id, m.log_time)] == m.size for m in known)
    # A CompressedImage with no image bytes is only its CDR header: the index shows it.
    assert any(m.size is not None and m.size < 64 for m in known)
