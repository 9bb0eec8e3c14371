"""The fast tier's message indexes give the same timelines and sizes as reading every
message — including the last message of each chunk and zero-byte frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mcap.reader import make_reader

from keystone_core.qa.inventory import Limits, indexed_inventory, scanned_inventory
from keystone_core.qa.source import LocalSource
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
    expected: dict[int, list[tuple[int, int]]] = {}
    with episode.mcap_path.open("rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        assert summary is not None
        assert len(summary.chunk_indexes) > 1
        for _schema, channel, message in reader.iter_messages():
            expected.setdefault(channel.id, []).append((message.log_time, len(message.data)))
    for inventory in (
        indexed_inventory(LocalSource(episode.mcap_path), Limits()),
        scanned_inventory(LocalSource(episode.mcap_path), Limits(), full=True),
    ):
        got = {
            cid: list(
                zip(
                    np.frombuffer(inventory.times[cid], dtype=np.int64).tolist(),
                    np.frombuffer(inventory.sizes[cid], dtype=np.int64).tolist(),
                    strict=True,
                )
            )
            for cid in inventory.times
        }
        assert got == {cid: sorted(v) for cid, v in expected.items()}, inventory.tier
        # A CompressedImage with no image bytes is only its CDR header: the sizes show it.
        assert any(size < 64 for values in got.values() for _, size in values)
