"""Where the CPU goes during a scenario's measured phase, per process group: the server, the
database and Redis servers, and our own load generators (the sender, this process, and the
receiver process). On 2 shared cores a rate says little by itself; CPU per operation says what
each side costs, and the machine's busy time over the same interval shows the load nobody here
put on it.

Read from Linux /proc (utime+stime of each process, its own threads included, its reaped
children not: a group counts the children it owns by pid). Elsewhere every figure is None.
"""

from __future__ import annotations

import os
import time
from typing import Any

# The groups, in the order the reports show them, and the process names that make up the shared
# services (everything of that name on the machine: other users of the same server count too).
GROUPS = ("server", "mariadbd", "redis", "sender", "receiver")
SERVICES = {"mariadbd": ("mariadbd", "mysqld"), "redis": ("redis-server",)}
FIELDS = (*GROUPS, "machine", "other")
Sample = dict[int, tuple[int, int]]  # pid -> (utime + stime, starttime), in clock ticks


def _stat(pid: int) -> tuple[str, list[str]]:
    """The process's name and the fields after it (field 3, `state`, is index 0)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        data = f.read()
    return data[data.index("(") + 1:data.rindex(")")], data[data.rindex(")") + 2:].split()


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (name, parent pid) of every process we can see."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                name, rest = _stat(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            found[int(entry)] = (name, int(rest[1]))
    return found


def _machine_busy() -> tuple[int, int]:
    """(busy ticks of all cores together, number of cores) from /proc/stat: everything but idle and iowait."""
    with open("/proc/stat", encoding="ascii") as f:
        lines = f.read().splitlines()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in lines[0].split()[1:9])
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return user + nice + system + irq + softirq + steal, cores


class CpuMeter:
    """start() and stop() where the scenario starts and stops its timer; figures() divides by
    what that timer's result counts. Processes are found when the meter is made (before the
    phase), so finding them costs the phase nothing; one that ends or appears during the phase
    is left out."""

    def __init__(self, server_pid: int | None, receiver_pid: int | None) -> None:
        self._tick_ms = 1000 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 10.0
        self._before: tuple[float, Sample, tuple[int, int]] | None = None
        self._after: tuple[float, Sample, tuple[int, int]] | None = None
        try:
            processes = _processes()
            _machine_busy()
        except (OSError, ValueError):  # no Linux /proc: nothing to read
            self.pids: dict[str, list[int]] | None = None
            return
        self.pids = {"server": _family(server_pid, processes) if server_pid else [],
                     "sender": [os.getpid()], "receiver": [receiver_pid] if receiver_pid else []}
        for group, names in SERVICES.items():
            self.pids[group] = [pid for pid, (name, _) in processes.items() if name in names]

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        if self._after is None:
            self._after = self._sample()

    def _sample(self) -> tuple[float, Sample, tuple[int, int]] | None:
        if self.pids is None:
            return None
        ticks: Sample = {}
        for pid in {pid for pids in self.pids.values() for pid in pids}:
            try:
                _, rest = _stat(pid)
                ticks[pid] = (int(rest[11]) + int(rest[12]), int(rest[19]))
            except (OSError, ValueError, IndexError):
                pass
        return time.monotonic(), ticks, _machine_busy()

    def figures(self, ops: int, per: str) -> dict[str, Any]:
        """Flat result keys: the phase's wall time, and per group its CPU in ms, ms per
        operation and cores used (CPU seconds per wall second; the machine has `cpu_cores`)."""
        out: dict[str, Any] = {"cpu_per": per, "cpu_ops": ops, "cpu_phase_seconds": None, "cpu_cores": None}
        for group in FIELDS:
            out.update({f"cpu_{group}_ms": None, f"cpu_{group}_ms_per_op": None, f"cpu_{group}_cores": None})
        if not self._before or not self._after or self.pids is None:
            return out
        (t0, before, (busy0, cores)), (t1, after, (busy1, _)) = self._before, self._after
        wall = max(t1 - t0, 1e-9)
        ms: dict[str, float | None] = {}
        for group in GROUPS:
            both = [pid for pid in self.pids[group] if pid in before and pid in after and before[pid][1] == after[pid][1]]
            ms[group] = sum(after[pid][0] - before[pid][0] for pid in both) * self._tick_ms if both else None
        ms["machine"] = (busy1 - busy0) * self._tick_ms
        # Process and machine times are counted differently (per task vs per tick): floored at 0.
        ms["other"] = max(0.0, ms["machine"] - sum(v for g, v in ms.items() if g in GROUPS and v is not None))
        out.update({"cpu_phase_seconds": round(wall, 3), "cpu_cores": cores})
        for group, value in ms.items():
            if value is not None:
                out[f"cpu_{group}_ms"] = round(value, 1)
                out[f"cpu_{group}_ms_per_op"] = round(value / ops, 4) if ops else None
                out[f"cpu_{group}_cores"] = round(value / 1000 / wall, 3)
        return out


def _family(root: int, processes: dict[int, tuple[str, int]]) -> list[int]:
    """The process and its descendants (a supervisor's workers are the server too)."""
    family, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, (_, parent) in processes.items() if parent in frontier]
        family += frontier
    return family
