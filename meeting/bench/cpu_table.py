"""The suite's second table: where the CPU went in each scenario's measured phase, per side, and
the rate that CPU cost allows. A target the machine cannot meet shows here as a ceiling below
the yardstick's rate: the bench's own processes, the server and its services need more CPU per
operation than the 2 shared cores have per second."""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

from .cpu import FIELDS, GROUPS

LABELS = {"server": "server", "mariadbd": "mariadbd", "redis": "redis-server", "sender": "sender", "receiver": "receiver",
          "other": "other load", "machine": "machine busy"}


def uses(side: str, env: dict[str, str]) -> tuple[str, ...]:
    """The groups a side's work runs in: the toy needs no services, `meeting` those its env names."""
    services = () if side == "toy" else (("mariadbd",) if "mysql" in env.get("MEETING_DATABASE_URL", "") else ()) + (
        ("redis",) if env.get("MEETING_REDIS_URL") else ())
    return ("server", *services, "sender", "receiver")


def run_line(result: dict[str, Any]) -> str:
    """One run's figures for the progress line on stderr."""
    if result.get("cpu_server_ms") is None and result.get("cpu_machine_ms") is None:
        return "CPU n/a"
    groups = ", ".join(f"{LABELS[g]} {_ms(result.get(f'cpu_{g}_ms_per_op'))}" for g in FIELDS if g != "machine")
    return (f"CPU ms/{result['cpu_per']}: {groups}; machine {_cores(result.get('cpu_machine_cores'))} of "
            f"{result.get('cpu_cores')} cores over {result.get('cpu_phase_seconds')} s")


def cpu_table(rows: Sequence[tuple[str, str, list[dict[str, Any]]]], env: dict[str, str], fmt: Callable[[float], str]) -> str:
    """rows: (scenario label, side, its runs). Every cell is a median over the runs."""
    cores = next((r["cpu_cores"] for _, _, runs in rows for r in runs if r.get("cpu_cores")), None)
    lines = [f"CPU in each scenario's measured phase (the time its headline figure divides by), median of the runs: "
             f"ms of CPU per operation [cores used, of the machine's {cores or 'n/a'}]; the ceilings are the rates that "
             f"CPU cost allows (operations per second: the server on 1 core; the side's processes and services on all cores)",
             "", "| scenario | side | per | phase (s) | " + " | ".join(LABELS[g] for g in (*GROUPS, "other", "machine"))
             + " | server ceiling (ops/s, 1 core) | machine ceiling (ops/s) |",
             "|" + "---|" * 13]
    toy_server: dict[str, float] = {}
    for label, side, runs in rows:
        if not runs:
            continue
        ms = {g: _median(runs, f"cpu_{g}_ms_per_op") for g in FIELDS}
        cells = [f"{_ms(ms[g])} [{_cores(_median(runs, f'cpu_{g}_cores'))}]" for g in (*GROUPS, "other", "machine")]
        server = ms["server"]
        if side == "toy" and server:
            toy_server[label] = server
        elif server and label in toy_server:
            cells[0] += f" = {server / toy_server[label]:.1f}x toy"
        mine = [ms[g] for g in uses(side, env)]
        ceiling = fmt(1000 / server) if server else "n/a"
        known = [m for m in mine if m is not None]
        whole = fmt(cores * 1000 / sum(known)) if cores and len(known) == len(mine) and sum(known) else "n/a"
        phase = _median(runs, "cpu_phase_seconds")
        lines.append(f"| {label} | {side} | {runs[0].get('cpu_per', '-')} | {'n/a' if phase is None else fmt(phase)} | "
                     + " | ".join(cells) + f" | {ceiling} | {whole} |")
    lines += ["", "mariadbd and redis-server are everything those servers did meanwhile, for anyone on the machine; "
                  "a side that does not use them (the toy; meeting without them) leaves them out of its machine ceiling. "
                  "Other load: the machine's busy time minus all of the above."]
    return "\n".join(lines)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
