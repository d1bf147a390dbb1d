"""shmalloc.dask.LocalCluster: Dask's LocalCluster whose workers keep their data in one arena."""

from __future__ import annotations

from typing import Any

import distributed

from .plugin import DEFAULT_CAPACITY, ShmallocPlugin

__all__ = ["LocalCluster"]


class LocalCluster(distributed.LocalCluster):
    """``distributed.LocalCluster(...)`` with :class:`ShmallocPlugin` registered on every worker
    (now and after any restart). ``capacity``, ``min_size`` and ``eager_size`` go to the plugin;
    everything else to Dask (``processes=True``, the default, is where sharing pays)."""

    def __init__(
        self,
        *args: Any,
        capacity: int = DEFAULT_CAPACITY,
        min_size: int = 64 * 1024,
        eager_size: float = 1 << 20,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[no-untyped-call]
        self.shmalloc_plugin = ShmallocPlugin(capacity, min_size=min_size, eager_size=eager_size)
        if self.asynchronous:
            raise NotImplementedError("shmalloc.dask.LocalCluster runs synchronously only")
        with distributed.Client(self) as client:  # type: ignore[no-untyped-call]
            client.register_plugin(self.shmalloc_plugin)
