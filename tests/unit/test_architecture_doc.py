"""docs/architecture.md's state-machine and Dagster tables are the code's, entry for entry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keystone_core.states import MACHINES, StateMachine

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
SECTION = "## State machines"
ROW = re.compile(r"^\|\s*`?([a-z_]+)`?\s*\|\s*`?([a-z_]+)`?\s*\|\s*([a-z_]+)\s*\|$")
NAMES = re.compile(r"`([a-z_]+)`")
KINDS = {"ordinary", "requeue"}


@dataclass
class DocumentedMachine:
    """What the document says about one machine."""

    name: str
    states: list[str] = field(default_factory=list)
    final: set[str] = field(default_factory=set)
    edges: list[tuple[str, str, str]] = field(default_factory=list)


def parse_state_tables(text: str) -> dict[str, DocumentedMachine]:
    """Read every ``### <machine>`` section under ``## State machines``."""
    machines: dict[str, DocumentedMachine] = {}
    current: DocumentedMachine | None = None
    in_section = False
    in_fence = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if line.startswith("## "):
            in_section = line == SECTION
            current = None
            continue
        if not in_section:
            continue
        if line.startswith("### "):
            name = line.removeprefix("### ").strip().lower()
            assert name not in machines, f"machine {name!r} documented twice"
            current = machines[name] = DocumentedMachine(name)
        elif current is None:
            continue
        elif line.startswith("States:"):
            current.states = NAMES.findall(line)
        elif line.startswith("Final states:"):
            current.final = set(NAMES.findall(line))
        elif (match := ROW.match(line)) is not None:
            source, target, kind = match.groups()
            if (source, target, kind) == ("from", "to", "kind"):
                continue  # the header row
            assert kind in KINDS, f"{current.name}: unknown kind {kind!r} in {line!r}"
            current.edges.append((source, target, kind))
    return machines


def code_edges(machine: StateMachine[Any]) -> set[tuple[str, str, str]]:
    ordinary = {(s.value, t.value, "ordinary") for s, t in machine.transitions}
    requeues = {(s.value, t.value, "requeue") for s, t in machine.requeues}
    return ordinary | requeues


@pytest.fixture(scope="module")
def documented() -> dict[str, DocumentedMachine]:
    return parse_state_tables(DOC.read_text(encoding="utf-8"))


def test_every_machine_is_documented_and_nothing_else(
    documented: dict[str, DocumentedMachine],
) -> None:
    assert set(documented) == set(MACHINES)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_edges_match_the_code(name: str, documented: dict[str, DocumentedMachine]) -> None:
    doc = documented[name]
    assert len(doc.edges) == len(set(doc.edges)), f"{name}: a row is listed twice"
    assert set(doc.edges) == code_edges(MACHINES[name])


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_states_and_final_states_match_the_code(
    name: str, documented: dict[str, DocumentedMachine]
) -> None:
    machine = MACHINES[name]
    doc = documented[name]
    assert doc.states == [s.value for s in machine.states]
    assert doc.final == {s.value for s in machine.final}


def test_a_drifted_table_is_noticed(documented: dict[str, DocumentedMachine]) -> None:
    """The parser really reads the rows: dropping or relabelling one changes the result."""
    text = DOC.read_text(encoding="utf-8")
    row = "| `failed` | `queued` | requeue |"
    assert row in text
    dropped = parse_state_tables(text.replace(row + "\n", ""))
    assert set(dropped["sync"].edges) != code_edges(MACHINES["sync"])
    relabelled = parse_state_tables(text.replace(row, "| `failed` | `queued` | ordinary |"))
    assert set(relabelled["sync"].edges) != code_edges(MACHINES["sync"])
    assert set(documented["sync"].edges) == code_edges(MACHINES["sync"])


def test_rows_outside_the_section_are_ignored() -> None:
    text = "\n".join(
        [
            "## Elsewhere",
            "### Sync",
            "| `queued` | `synced` | ordinary |",
            "## State machines",
            "### Sync",
            "Final states: `synced`.",
            "| from | to | kind |",
            "|---|---|---|",
            "| `queued` | `in_progress` | ordinary |",
            "```",
            "| `in_progress` | `synced` | ordinary |",
            "```",
        ]
    )
    parsed = parse_state_tables(text)
    assert parsed["sync"].edges == [("queued", "in_progress", "ordinary")]
    assert parsed["sync"].final == {"synced"}


def _first_cells(heading: str) -> set[str]:
    """Names in the first column of the table whose header starts with ``heading``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    names: set[str] = set()
    inside = False
    for line in lines:
        if line.startswith(f"| {heading} "):
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            cell = line.split("|")[1].strip()
            if cell.startswith("`"):
                names.add(cell.strip("`"))
    return names


def test_dagster_tables_list_every_job_sensor_and_schedule() -> None:
    from keystone_pipelines.definitions import defs

    repository = defs.get_repository_def()
    jobs = {j.name for j in repository.get_all_jobs() if not j.name.startswith("__")}
    sensors = {s.name for s in repository.sensor_defs}
    schedules = {s.name for s in repository.schedule_defs}
    assert _first_cells("job") == jobs
    assert _first_cells("sensor") == sensors
    assert _first_cells("schedule (UTC)") == schedules
