"""The retry policy of OPAL, in one place: which layer retries what, with caps and jitter.

Every retry in the project computes its delay with :class:`Backoff` (capped exponential,
with jitter so that many workers do not retry in step). The layers and their budgets:

1. **Inference client** (:mod:`inference.client`): a request that fails with a transport
   error, a timeout, HTTP 429 or 5xx is tried on the other endpoints; ``max_retries``
   bounds the attempts of one call. Standalone callers (the CLI data passes, evaluation)
   use ``OPAL_VLLM_MAX_RETRIES`` with backoff. The enrichment worker builds its client for
   *failover only*: each endpoint at most once per call, no sleeping, because the worker
   owns time (layer 2 and 3). 4xx and invalid output are never retried by the client.
2. **Record retries** (the enrichment worker): a failure that may be specific to one record
   and may pass next time (an image host answering 5xx for one URL, the schema registry
   refusing a lookup) is retried ``OPAL_WORKER_MAX_ATTEMPTS`` times with
   ``Backoff(OPAL_WORKER_RETRY_BACKOFF_S, OPAL_WORKER_RETRY_BACKOFF_MAX_S)``, then
   dead-lettered with its attempt count. Between two outages a record therefore costs at
   most ``max_attempts x endpoints`` model calls (an outage wait gives it a full budget again,
   since failures just before an outage were most likely the outage).
3. **Dependency outages** (every stream worker): when a dependency (the model, an image host,
   Redis) fails for ``OPAL_WORKER_BREAKER_FAILURES`` consecutive records, or when a record
   would exhaust its attempts and nothing answered since its first failure, the dependency's
   circuit breaker (:mod:`workers.circuit`) opens: the worker pauses its partitions, records
   already held wait (their attempts do not count), and the dependency is probed with
   ``Backoff(OPAL_WORKER_BREAKER_PROBE_S, OPAL_WORKER_BREAKER_PROBE_MAX_S)`` until it answers.
   An outage of the model never produces a dead letter; a record is dead-lettered for a
   dependency error only when the dependency answered (others, or a probe: a one-token
   generation for the model) after the record first failed. An image host that stays down
   longer than ``OPAL_WORKER_IMAGE_HOST_MAX_WAIT_S`` dead-letters its records
   (``image_fetch_failed``): a host can disappear for good, the model cannot. The indexer and
   the agents have no other records to compare with: they probe by retrying the operation.

Retries never stack across layers beyond these products; nothing else in the code retries.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Capped exponential delays with jitter: attempt ``n`` (1-based) waits around
    ``base_s * 2**(n-1)``, never more than ``cap_s``, spread by +-``jitter`` of itself."""

    base_s: float
    cap_s: float = 30.0
    jitter: float = 0.5

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt ``attempt + 1``; 0 when ``base_s`` is 0."""
        if self.base_s <= 0:
            return 0.0
        raw = min(self.cap_s, self.base_s * 2 ** max(0, attempt - 1))
        spread = raw * self.jitter
        return max(0.0, min(self.cap_s, raw - spread + 2 * spread * rand()))
