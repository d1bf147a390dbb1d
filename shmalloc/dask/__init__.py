"""shmalloc under Dask distributed: the workers of a cluster on one host share one arena.

    from shmalloc.dask import LocalCluster
    with LocalCluster(n_workers=4) as cluster, distributed.Client(cluster) as client:
        ...

or, on any cluster: ``client.register_plugin(shmalloc.dask.ShmallocPlugin(capacity=...))``.
Needs the ``dask`` extra (``pip install 'shmalloc[dask]'``). See docs/dask.md.
"""

from __future__ import annotations

from typing import Any

from .host import HOST_ENV, arena_name, host_identity

__all__ = ["HOST_ENV", "LocalCluster", "ShmallocPlugin", "arena_name", "host_identity"]


def __getattr__(name: str) -> Any:
    # lazy: the host coordinator (python -m shmalloc.dask.janitor) must not import Dask
    if name in ("ShmallocPlugin", "LocalCluster"):
        try:
            from .cluster import LocalCluster
            from .plugin import ShmallocPlugin
        except ImportError as e:
            raise ImportError(
                f"shmalloc.dask.{name} needs Dask distributed: pip install 'shmalloc[dask]' ({e})"
            ) from e
        return {"ShmallocPlugin": ShmallocPlugin, "LocalCluster": LocalCluster}[name]
    raise AttributeError(f"module 'shmalloc.dask' has no attribute {name!r}")
