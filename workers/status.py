"""Where running workers say they are, and what their /metrics say about stuck work.

Contract
- :func:`announce` writes ``<run dir>/workers/<kind>-<pid>.json`` (the worker's metrics URL)
  and returns its path; the worker removes it on a clean exit (:func:`withdraw`). A file
  whose process is gone is ignored and removed by :func:`announced` (after kill -9).
- :func:`scrape` reads one worker's /metrics into a :class:`WorkerStatus`: per-partition lag
  and commit lag, records in flight and the age of the oldest, open circuit breakers and
  dead letters by reason. Read-only; safe to call at any time, any number of times.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class WorkerStatus:
    url: str
    in_flight: float = 0.0
    oldest_in_flight_s: float = 0.0
    paused_partitions: float = 0.0
    outputs: float = 0.0
    lag: dict[tuple[str, str], float] = field(default_factory=dict)
    commit_lag: dict[tuple[str, str], float] = field(default_factory=dict)
    open_breakers: list[str] = field(default_factory=list)
    dead_letters: dict[str, float] = field(default_factory=dict)
    cache_errors: float = 0.0


def _dir(run_dir: Path) -> Path:
    return run_dir / "workers"


def announce(run_dir: Path, kind: str, metrics_url: str) -> Path:
    d = _dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{kind}-{os.getpid()}.json"
    path.write_text(json.dumps({"kind": kind, "pid": os.getpid(), "metrics_url": metrics_url}))
    return path


def withdraw(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def announced(run_dir: Path) -> list[dict[str, object]]:
    """Workers that announced themselves under ``run_dir`` and are still running."""
    out: list[dict[str, object]] = []
    for path in sorted(_dir(run_dir).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(info.get("pid", 0))):
            out.append(info)
        else:
            path.unlink(missing_ok=True)
    return out


def scrape(url: str, timeout_s: float = 5.0) -> WorkerStatus:
    """Parse one worker's /metrics (raises OSError when it does not answer)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        text = r.read().decode()
    st = WorkerStatus(url)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            where = (labels.get("topic", ""), labels.get("partition", ""))
            if name == "opal_enrich_in_flight":
                st.in_flight += value
            elif name == "opal_enrich_oldest_in_flight_seconds":
                st.oldest_in_flight_s = value
            elif name == "opal_enrich_paused_partitions":
                st.paused_partitions = value
            elif name in ("opal_enrich_aspect_events_total", "opal_index_records_total"):
                st.outputs += value
            elif name in ("opal_enrich_lag", "opal_index_lag"):
                st.lag[where] = value
            elif name == "opal_enrich_commit_lag":
                st.commit_lag[where] = value
            elif name in ("opal_enrich_breaker_open", "opal_index_redis_breaker_open") and value > 0:
                st.open_breakers.append(labels.get("dependency", "redis"))
            elif name in ("opal_enrich_dead_letters_total", "opal_index_dead_letters_total"):
                st.dead_letters[labels.get("reason", "?")] = st.dead_letters.get(labels.get("reason", "?"), 0) + value
            elif name == "opal_enrich_cache_errors_total":
                st.cache_errors += value
    return st
