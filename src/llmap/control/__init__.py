"""Dispatch policies: rate limits, concurrency, retries, circuit breaking, lanes, cascades, packing.

Every policy here is a small object whose decisions are pure functions of its
state and an explicit ``now`` (clock seconds); only :class:`~llmap.control.limits.Limiter`
awaits, through an injected ``sleep``. One concept per module:

- :mod:`~llmap.control.limits` RPM/TPM token buckets and the limiter;
  :mod:`~llmap.control.headers` rate-limit headers and Retry-After;
  :mod:`~llmap.control.tokens` token estimates for TPM reservations;
- :mod:`~llmap.control.concurrency` AIMD; :mod:`~llmap.control.retry` backoff;
  :mod:`~llmap.control.breaker` circuit breaker; :mod:`~llmap.control.timeouts` adaptive timeout;
- :mod:`~llmap.control.lanes` one lane per model and the failover rule;
- :mod:`~llmap.control.cascade` ``escalate_if``; :mod:`~llmap.control.packsize` ``pack = "auto"``;
- :mod:`~llmap.control.quota` per-group quotas; :mod:`~llmap.control.alerts` failure-rate alerts;
- :mod:`~llmap.control.dialect` what a server takes; :mod:`~llmap.control.misconfig`
  configuration errors told apart from outages.

Import from the modules themselves; this package imports nothing, so using
one policy never loads the others.
"""
