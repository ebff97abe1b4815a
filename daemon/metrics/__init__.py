"""Prometheus metrics and the health endpoint of ``trainingd run`` (Documents/METRICS.md).

Rooms: :mod:`.core` (the dedicated registry, task accounting, the health verdict, the
node_exporter textfile), :mod:`.figures` (state DB, registry and summaries read at scrape time
through a read-only connection, cached), :mod:`.listener` (the optional loopback HTTP server).
The service lends facts through one seam (``live(quiet_limit) -> LiveFacts``) and reports each
finished task; nothing here waits on the worker or raises into it.
"""

from __future__ import annotations

from daemon.metrics.core import Health, LiveFacts, Metrics, judge_health, lane_of
from daemon.metrics.listener import Listener, start_listener

__all__ = ["Health", "Listener", "LiveFacts", "Metrics", "judge_health", "lane_of",
           "start_listener"]
