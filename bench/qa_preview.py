"""Benchmark: QA previews (contact sheet + message-rate timeline) against the fast QA tier.

For a few generated episodes — ``keystone gen-mcap``'s default (10 s, one camera at
10 Hz with small frames, a 100 Hz IMU), a 3 s pipeline-test episode and a camera-like
one (three 30 Hz cameras with ~300 KB frames, a 200 Hz IMU) — it times, on the local
file and as the median of ``--repeat`` runs: the fast tier (``assess``) and drawing both
previews from what that tier read (``render_previews``). The ratio preview / fast tier
is what QA_PREVIEW=all would add to every episode; the first drawing in a process also
pays matplotlib's import (reported apart).

    uv run python bench/qa_preview.py [--repeat 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from keystone_core.qa.checks import Expectations
from keystone_core.qa.preview import render_previews
from keystone_core.qa.run import FAST, assess
from keystone_core.qa.source import LocalSource
from keystone_core.simulation.episodes import DEFAULT_TOPICS, EpisodeSpec, TopicSpec, generate

CAMERAS = (
    TopicSpec("/imu/data", "sensor_msgs/msg/Imu", 200.0),
    *(
        TopicSpec(f"/camera{i}/rgb/compressed", "sensor_msgs/msg/CompressedImage", 30.0)
        for i in range(3)
    ),
)
EPISODES = {
    "gen-mcap default (10 s, 1 camera)": EpisodeSpec(task_id="default", device_id="bench"),
    "pipeline test (3 s, 1 camera)": EpisodeSpec(
        task_id="short", device_id="bench", duration_s=3.0
    ),
    "camera-like (20 s, 3 x 30 Hz, 160 MiB)": EpisodeSpec(
        task_id="cameras",
        device_id="bench",
        duration_s=20.0,
        topics=CAMERAS,
        target_bytes=160 * 2**20,
    ),
}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-preview-"))
    print(f"{'episode':<40} {'size':>9} {'fast QA':>9} {'previews':>9} {'ratio':>6} {'read':>9}")
    first_call: float | None = None
    for label, spec in EPISODES.items():
        episode = generate(spec, work / spec.task_id)
        expect = Expectations(required_topics=tuple(t.name for t in spec.topics or DEFAULT_TOPICS))
        qa_times, preview_times, read = [], [], 0
        for _ in range(args.repeat):
            source = LocalSource(episode.mcap_path)
            started = time.perf_counter()
            report = assess(source, expect, tier=FAST, keep_inventory=True)
            qa_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            previews = render_previews(
                source, report.inventory, title=label, required_topics=expect.required_topics
            )
            elapsed = time.perf_counter() - started
            source.close()
            if first_call is None:
                first_call = elapsed  # includes importing matplotlib: not in the median
                continue
            preview_times.append(elapsed)
            read = previews.bytes_read
            assert previews.contact_sheet, previews.notes
            assert previews.rate_timeline, previews.notes
        qa_ms, preview_ms = median_ms(qa_times), median_ms(preview_times)
        print(
            f"{label:<40} {episode.size / 2**20:>7.1f}Mi {qa_ms:>7.0f}ms {preview_ms:>7.0f}ms "
            f"{preview_ms / qa_ms:>5.1f}x {read / 2**20:>7.1f}Mi"
        )
    print(f"\nfirst drawing in a process (matplotlib import, font cache): {first_call:.2f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
