"""Shared pieces of the benchmarks: machine description and writing results into docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
import re
import resource
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import PIL
    import sqlalchemy

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, Pillow {PIL.__version__}, SQLAlchemy {sqlalchemy.__version__}")


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory of this process (or of its largest waited-for child process), in MiB.

    For this process, Linux's VmHWM: getrusage's ru_maxrss survives execve, so a benchmark child started by
    a large driver would report the driver's size instead of its own.
    """
    if not children:
        try:
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024
        except (OSError, AttributeError):
            pass
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of docs/benchmarks.md."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nEach section is written by the script named in it.\n"
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOCS.write_text(text.rstrip() + "\n")
