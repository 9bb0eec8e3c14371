"""Benchmark: episode QA (``keystone_core.qa``) — fast tier, thorough tier, a full read.

Sections (subcommands; ``library`` is the default):

``library``
    One large generated episode (default 1 GiB: three 30 Hz cameras with camera-like JPEG
    frames + a 200 Hz IMU, 90 s, zstd chunks of 4 MiB), cached in ``--work``. Measures, in
    one run and each ``--repeat`` times (median): the fast tier, the thorough tier and a
    full ``mcap`` reader pass (``make_reader(f).iter_messages()``, the in-run baseline) on
    the local file; then, unless ``--no-s3``, the fast tier and a full pass over ranged
    GETs against a private SeaweedFS. Then the fault corpus — a clean episode, one per
    fault in ``FAULTS`` and a multi-chunk file truncated mid-data — through both tiers:
    the fast tier must reach the thorough tier's verdict on every file.

``pipeline``
    Throughput of the Dagster pipeline: ``--episodes`` small episodes pending → all
    scored, by the library in a plain loop and by ``pending_qa_sensor`` + ``qa_batch``
    runs in their own processes; episodes/min and the overhead ratio (``qa_pipeline.py``).

    uv run python bench/qa.py [library] [--size-gb 1.0] [--repeat 3] [--no-s3] [--work DIR]
    uv run python bench/qa.py pipeline [--episodes 1000] [--mariadb 127.0.0.1:3306]

Targets (library): the fast tier at least 20x faster than the full pass, reading at most
3 % of the file, and within 0.3 s for a 1 GB episode. Local reads hit the page cache (the
file was just generated or read), so the local ratios compare CPU, not disk.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcap.reader import make_reader

from keystone_core.qa.checks import Expectations
from keystone_core.qa.run import FAST, THOROUGH, Report, assess
from keystone_core.qa.source import LocalSource, S3Source, Source
from keystone_core.simulation import episodes
from keystone_core.simulation.episodes import FAULTS, Episode, EpisodeSpec, TopicSpec, generate
from keystone_core.storage import EmbeddedS3Server, create_s3_client_for_endpoint
from keystone_core.storage.reader import S3RangeReader

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

GB = 10**9
GIB = 2**30
DURATION_S = 90.0
CAMERA = "sensor_msgs/msg/CompressedImage"
LARGE_TOPICS = (
    TopicSpec("/imu/data", "sensor_msgs/msg/Imu", 200.0),
    TopicSpec("/camera0/rgb/compressed", CAMERA, 30.0),
    TopicSpec("/camera1/rgb/compressed", CAMERA, 30.0),
    TopicSpec("/camera2/rgb/compressed", CAMERA, 30.0),
)
STARTED_AT = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # fixed: same parameters, same bytes
DEVICE_ID = "AB-F0001-T0001-000001"
BUCKET = "bench-qa"
# Targets (docs/performance.md, "QA").
TARGET_SPEEDUP = 20.0
TARGET_READ_FRACTION = 0.03
TARGET_FAST_S_PER_GB = 0.3


def say(line: str) -> None:
    print(line, flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"


# --- episodes ------------------------------------------------------------------------------


@contextmanager
def growing(path: Path, label: str, every_s: float = 5.0) -> Iterator[None]:
    """Print the size of a file being written every few seconds (generation progress)."""
    done = threading.Event()
    started = time.perf_counter()

    def report() -> None:
        while not done.wait(every_s):
            size = path.stat().st_size if path.exists() else 0
            say(f"  {label}: {mb(size)} after {time.perf_counter() - started:.0f} s")

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def generator_version() -> str:
    """Digest of the generator's source: a changed generator invalidates the cache."""
    return hashlib.sha256(inspect.getsource(episodes).encode()).hexdigest()[:16]


def cached_episode(spec: EpisodeSpec, out_dir: Path) -> Episode:
    """``generate(spec, out_dir)``, reused when ``out_dir`` holds one of the same parameters."""
    params = {
        "task_id": spec.task_id,
        "device_id": spec.device_id,
        "duration_s": spec.duration_s,
        "topics": [[t.name, t.message_type, t.rate_hz] for t in spec.topics],
        "target_bytes": spec.target_bytes,
        "faults": sorted(spec.faults),
        "started_at": spec.started_at.isoformat(),
        "seed": spec.seed,
        "generator": generator_version(),
    }
    marker = out_dir / f"{spec.task_id}.bench.json"
    mcap_path = out_dir / f"{spec.task_id}.mcap"
    if marker.exists() and mcap_path.exists():
        cached = json.loads(marker.read_text())
        if cached["params"] == params and mcap_path.stat().st_size == cached["size"]:
            say(f"reusing {mcap_path} ({mb(cached['size'])}, same parameters)")
            return Episode(
                mcap_path=mcap_path,
                sidecar_path=out_dir / f"{spec.task_id}.json",
                sha256=cached["sha256"],
                size=cached["size"],
                message_count=cached["message_count"],
                started_at=spec.started_at,
                finished_at=datetime.fromisoformat(cached["finished_at"]),
                topic_counts=cached["topic_counts"],
            )
    marker.unlink(missing_ok=True)
    target = spec.target_bytes or 0
    say(f"generating {mcap_path} (target {mb(target)}, {spec.duration_s:.0f} s) ...")
    started = time.perf_counter()
    with growing(mcap_path, "written"):
        episode = generate(spec, out_dir)
    say(f"  done: {mb(episode.size)} in {time.perf_counter() - started:.1f} s")
    marker.write_text(
        json.dumps(
            {
                "params": params,
                "size": episode.size,
                "sha256": episode.sha256,
                "message_count": episode.message_count,
                "finished_at": episode.finished_at.isoformat(),
                "topic_counts": episode.topic_counts,
            },
            indent=2,
        )
    )
    return episode


def expectations(spec: EpisodeSpec, episode: Episode) -> Expectations:
    return Expectations(
        checksum_sha256=episode.sha256,
        required_topics=tuple(t.name for t in spec.topics),
        task_id=spec.task_id,
        device_id=spec.device_id,
    )


# --- measurements --------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    seconds: list[float] = field(default_factory=list)
    bytes_read: int = 0
    requests: int | None = None  # None: not counted (a local file read by mcap)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def timed_assess(
    label: str,
    open_source: Callable[[], Source],
    expect: Expectations,
    tier: str,
    repeat: int,
) -> tuple[Result, Report]:
    """Wall time of ``assess`` (opening the source and reading the sidecar included)."""
    result = Result(label)
    report: Report | None = None
    for i in range(repeat):
        started = time.perf_counter()
        source = open_source()
        try:
            report = assess(source, expect, tier=tier)
        finally:
            source.close()
        result.seconds.append(time.perf_counter() - started)
        say(
            f"  {label} #{i + 1}: {result.seconds[-1]:.3f} s, "
            f"{mb(report.stats['bytes_read'])}, {report.stats['requests']} requests, "
            f"{report.verdict} ({report.score})"
        )
    assert report is not None
    result.bytes_read = int(report.stats["bytes_read"])
    result.requests = int(report.stats["requests"])
    result.note = report.verdict
    return result, report


def timed_full_pass(label: str, open_stream: Callable[[], Any], repeat: int) -> Result:
    """``make_reader(f).iter_messages()`` to the end: the in-run baseline."""
    result = Result(label)
    for i in range(repeat):
        started = time.perf_counter()
        stream = open_stream()
        try:
            messages = sum(1 for _ in make_reader(stream).iter_messages())
        finally:
            stream.close()
        result.seconds.append(time.perf_counter() - started)
        fetched = getattr(stream, "bytes_fetched", None)
        result.bytes_read = int(
            fetched if fetched is not None else Path(stream.name).stat().st_size
        )
        requests = getattr(stream, "requests", None)
        result.requests = int(requests) if requests is not None else None
        result.note = f"{messages} messages"
        say(f"  {label} #{i + 1}: {result.seconds[-1]:.3f} s, {messages} messages")
    return result


@contextmanager
def s3_store(work: Path) -> Iterator[tuple[EmbeddedS3Server, S3Client]]:
    """A private SeaweedFS as the tests start it (tests/support/s3.py), with a bucket."""
    data_dir = work / "s3"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = EmbeddedS3Server(
        data_dir=data_dir,
        access_key="BENCH" + secrets.token_hex(8).upper(),
        secret_key=secrets.token_urlsafe(30),
    )
    say("starting SeaweedFS ...")
    server.start(timeout=60)
    try:
        client = create_s3_client_for_endpoint(
            server.endpoint_url, access_key=server.access_key, secret_key=server.secret_key
        )
        client.create_bucket(Bucket=BUCKET)
        yield server, client
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def upload(client: S3Client, path: Path, key: str) -> None:
    size = path.stat().st_size
    sent = 0
    next_report = 0.0
    started = time.perf_counter()
    lock = threading.Lock()

    def progress(n: int) -> None:
        nonlocal sent, next_report
        with lock:
            sent += n
            if sent / size >= next_report:
                say(
                    f"  uploading {key}: {sent / size:4.0%} ({time.perf_counter() - started:.0f} s)"
                )
                next_report += 0.25

    client.upload_file(str(path), BUCKET, key, Callback=progress if size > 50e6 else None)


# --- fault corpus --------------------------------------------------------------------------


def corpus_specs() -> list[tuple[str, EpisodeSpec]]:
    """Clean, every fault on a small episode, and a multi-chunk file cut mid-data."""
    specs = [("clean", EpisodeSpec(task_id="corpus-clean", device_id=DEVICE_ID, seed=1))]
    for fault in sorted(FAULTS):
        specs.append(
            (
                fault,
                EpisodeSpec(
                    task_id=f"corpus-{fault}",
                    device_id=DEVICE_ID,
                    faults=frozenset({fault}),
                    seed=1,
                ),
            )
        )
    specs.append(
        (
            "truncate (multi-chunk)",
            EpisodeSpec(
                task_id="corpus-truncate-multichunk",
                device_id=DEVICE_ID,
                duration_s=10.0,
                topics=LARGE_TOPICS,
                target_bytes=20 * 2**20,
                faults=frozenset({"truncate"}),
                seed=1,
            ),
        )
    )
    return specs


def failing(report: Report) -> str:
    return ",".join(c.name for c in report.failing()) or "-"


def fault_corpus(work: Path) -> tuple[int, int, list[str]]:
    """Both tiers on every corpus file; (same verdicts, files, printed table rows)."""
    out_dir = work / "corpus"
    shutil.rmtree(out_dir, ignore_errors=True)
    rows = []
    same = 0
    specs = corpus_specs()
    say(f"\nfault corpus: {len(specs)} files in {out_dir}")
    rows.append(
        f"{'file':<24} {'size':>9} {'fast':<17} {'thorough':<17} {'same':<4} "
        "failing checks (fast | thorough)"
    )
    for name, spec in specs:
        episode = generate(spec, out_dir)
        expect = expectations(spec, episode)
        reports = []
        for tier in (FAST, THOROUGH):
            source = LocalSource(episode.mcap_path)
            try:
                reports.append(assess(source, expect, tier=tier))
            finally:
                source.close()
        fast, thorough = reports
        agree = fast.verdict == thorough.verdict
        same += agree
        row = (
            f"{name:<24} {mb(episode.size):>9} {fast.verdict:<17} {thorough.verdict:<17} "
            f"{'yes' if agree else 'NO':<4} {failing(fast)} | {failing(thorough)}"
        )
        rows.append(row)
        say(row)
    return same, len(specs), rows


# --- section: library ----------------------------------------------------------------------


def yes(ok: bool) -> str:
    return "met" if ok else "NOT met"


def bench_library(args: argparse.Namespace) -> None:
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    spec = EpisodeSpec(
        task_id=f"bench-qa-{args.size_gb:g}gib",
        device_id=DEVICE_ID,
        duration_s=DURATION_S,
        topics=LARGE_TOPICS,
        target_bytes=int(args.size_gb * GIB),
        started_at=STARTED_AT,
        seed=7,
    )
    episode = cached_episode(spec, work / "large")
    expect = expectations(spec, episode)
    path = episode.mcap_path
    with path.open("rb") as f:
        summary = make_reader(f).get_summary()
    chunks = len(summary.chunk_indexes) if summary else 0
    layout = (
        f"{mb(episode.size)} ({episode.size / GIB:.2f} GiB), "
        + " + ".join(f"{t.name.split('/')[1]} {t.rate_hz:g} Hz" for t in LARGE_TOPICS)
        + f", {DURATION_S:g} s, {chunks} chunks, {episode.message_count:,} messages"
    )
    say(f"\nfile: {layout}")
    repeat = args.repeat
    results: list[Result] = []

    say("\nlocal file")
    full = timed_full_pass("full pass (mcap iter_messages), local", lambda: path.open("rb"), repeat)
    fast, fast_report = timed_assess(
        "fast tier, local", lambda: LocalSource(path), expect, FAST, repeat
    )
    thorough, thorough_report = timed_assess(
        "thorough tier, local", lambda: LocalSource(path), expect, THOROUGH, repeat
    )
    results += [full, fast, thorough]

    s3_fast: Result | None = None
    s3_full: Result | None = None
    if not args.no_s3:
        say("\nS3 (SeaweedFS on this host, ranged GETs)")
        with s3_store(work) as (_server, client):
            key = path.name
            upload(client, path, key)
            upload(client, episode.sidecar_path, path.with_suffix(".json").name)
            s3_full = timed_full_pass(
                "full pass (mcap iter_messages), S3",
                lambda: S3RangeReader(client, BUCKET, key, episode.size),
                repeat,
            )
            s3_fast, _ = timed_assess(
                "fast tier, S3", lambda: S3Source(client, BUCKET, key), expect, FAST, repeat
            )
        results += [s3_full, s3_fast]

    same, total, corpus_rows = fault_corpus(work)

    # --- summary ----------------------------------------------------------------------
    speedup = full.median / fast.median
    fraction = fast.bytes_read / episode.size
    budget = TARGET_FAST_S_PER_GB * max(1.0, episode.size / GB)
    baselines = {"local": full.median, "S3": s3_full.median if s3_full else None}
    lines = [
        f"QA library — median of {repeat}; file: {layout}",
        f"host: {os.cpu_count()} cores, Python {platform.python_version()}; local reads from the "
        "page cache; S3 = SeaweedFS on the same host, boto3 ranged GETs",
        "",
        "| measurement | wall s | bytes read | read % | requests | full pass ÷ this |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        base = baselines["S3" if result.label.endswith("S3") else "local"]
        ratio = f"{base / result.median:.1f}x" if base else "-"
        lines.append(
            f"| {result.label} | {result.median:.3f} | {mb(result.bytes_read)} | "
            f"{100 * result.bytes_read / episode.size:.2f} | "
            f"{'-' if result.requests is None else result.requests} | {ratio} |"
        )
    lines += [
        "",
        f"verdicts on the large file: fast {fast_report.verdict} ({fast_report.score}), "
        f"thorough {thorough_report.verdict} ({thorough_report.score})",
        f"fast vs full pass (local): {speedup:.1f}x faster — target >= {TARGET_SPEEDUP:g}x: "
        f"{yes(speedup >= TARGET_SPEEDUP)}",
        f"fast bytes vs file size: {100 * fraction:.2f} % — target <= "
        f"{100 * TARGET_READ_FRACTION:g} %: {yes(fraction <= TARGET_READ_FRACTION)}",
        f"fast wall time: {fast.median:.3f} s — target <= {budget:.2f} s "
        f"({TARGET_FAST_S_PER_GB} s per GB, at least 1 GB): {yes(fast.median <= budget)}",
        f"thorough vs fast (local): {thorough.median / fast.median:.1f}x slower",
    ]
    if s3_fast and s3_full:
        lines.append(
            f"fast vs full pass (S3): {s3_full.median / s3_fast.median:.1f}x faster; "
            f"fast S3 / fast local: {s3_fast.median / fast.median:.1f}x"
        )
    lines += ["", f"fault corpus: same verdicts {same}/{total}", "", *corpus_rows]
    say("\n" + "=" * 30 + " summary " + "=" * 30)
    say("\n".join(lines))


# --- section: pipeline --------------------------------------------------------------------


def pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--episodes", type=int, default=1000, help="small episodes to score")
    parser.add_argument("--mariadb", default="127.0.0.1:3306", help="host:port (user root)")


def bench_pipeline(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from qa_pipeline import run  # type: ignore[import-not-found]  # bench/ is not a package

    run(args.episodes, args.mariadb, args.work)


def library_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="large episode size in GiB (default 1.0)"
    )


SECTIONS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
] = {
    "library": (
        "fast/thorough tiers vs a full read; fault corpus",
        library_arguments,
        bench_library,
    ),
    "pipeline": (
        "Dagster pipeline throughput vs the library in a plain loop",
        pipeline_arguments,
        bench_pipeline,
    ),
}
DEFAULT_SECTION = "library"


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS measurements")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="work directory; generated episodes are cached here (default: a new temp dir)",
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {*SECTIONS, "-h", "--help"}:
        argv.insert(0, DEFAULT_SECTION)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections = parser.add_subparsers(dest="section", required=True)
    for name, (help_text, add_arguments, run) in SECTIONS.items():
        sub = sections.add_parser(name, help=help_text)
        common_arguments(sub)
        add_arguments(sub)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="keystone-bench-qa-"))
    say(f"work directory: {args.work}")
    args.run(args)


if __name__ == "__main__":
    main()
