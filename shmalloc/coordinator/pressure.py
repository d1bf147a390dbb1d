"""The pressure the coordinator watches: of the arena, of the system's memory and of /dev/shm.

Every tick the coordinator reads the arena's usage, ``psutil.virtual_memory()`` and
``psutil.disk_usage('/dev/shm')``; :class:`PressureLevels` keeps the level of each source and logs
each change of level. At HIGH or worse the coordinator runs ``auto_collect()``.
"""

from __future__ import annotations

import logging

import psutil

from ..stats import MemoryPressure

__all__ = ["SHM_DIR", "PressureLevels", "system_usage"]

logger = logging.getLogger("shmalloc.coordinator")  # one logger for every part of the coordinator

SHM_DIR = "/dev/shm"  # where the arenas' segments live (a tmpfs)


def _level_name(level: int) -> str:
    return MemoryPressure(level).name


class PressureLevels:
    """Pressure levels by source (``SOURCES``), logging each change."""

    SOURCES = ("arena", "system memory", "/dev/shm")

    def __init__(self, arena: str) -> None:
        self._arena = arena
        self.levels: dict[str, int] = {}

    def observe(self, source: str, pct: float | None) -> int:
        level = MemoryPressure.LOW if pct is None else MemoryPressure.from_percentage(pct)
        old = self.levels.get(source)
        self.levels[source] = level
        if old is None and level == MemoryPressure.LOW:
            return level
        if old != level:
            where = f"arena {self._arena}" if source == "arena" else source
            severity = (
                logging.CRITICAL
                if level == MemoryPressure.CRITICAL
                else logging.WARNING
                if level == MemoryPressure.HIGH and (old or 0) < level
                else logging.INFO
            )
            logger.log(
                severity,
                "pressure of %s: %s -> %s (%.1f%% used)",
                where,
                "start" if old is None else _level_name(old),
                level.name,
                pct or 0.0,
            )
        return level

    @property
    def worst(self) -> MemoryPressure:
        return MemoryPressure(max(self.levels.values(), default=0))


def system_usage() -> tuple[float | None, float | None]:
    """Percent used of the system's memory and of /dev/shm; None where psutil cannot tell."""
    try:
        mem: float | None = float(psutil.virtual_memory().percent)
    except OSError:
        mem = None
    try:
        shm: float | None = float(psutil.disk_usage(SHM_DIR).percent)
    except OSError:
        shm = None
    return mem, shm
