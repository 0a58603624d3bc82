"""What the benchmarks read of a process from /proc: its memory (now and at its peak) and the
CPU it has used."""

from __future__ import annotations

import os
import re
from pathlib import Path


def status_kb(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: now), in kB."""
    try:
        found = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        return int(found.group(1)) if found else 0
    except OSError:
        return 0


def peak_rss_kb(pid: int) -> int:
    return status_kb(pid, "VmHWM")


def rss_kb(pid: int) -> int:
    return status_kb(pid, "VmRSS")


def private_kb(pid: int) -> int:
    """What the process alone holds (USS: its private pages, /proc/<pid>/smaps_rollup), in kB.
    RSS also counts the pages of shared libraries (libpython, pydantic-core, OpenSSL), which
    every unit on a machine shares: USS is what one more unit costs."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(n) for n in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", text, re.M))


def proportional_kb(pid: int) -> int:
    """PSS: its private pages and its share of the pages it shares with other processes (a
    shared library mapped by three units counts a third in each), in kB: the units of a
    machine sum to what they take together."""
    try:
        found = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
    except OSError:
        return 0
    return int(found.group(1)) if found else 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
