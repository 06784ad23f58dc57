"""The status server: ``/healthz``, ``/readyz``, ``/metrics`` and the HTML status page."""
