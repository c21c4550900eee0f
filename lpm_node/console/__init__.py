"""The administrators' web console: find a series, read its story, act on the queues, watch health and metrics.

Server-rendered pages (Starlette, Jinja2 with autoescaping, htmx shipped in ``static/``), a JSON API under
``/api/``, ``/health/live``, ``/health/ready`` and Prometheus ``/metrics``. It reads the audit database through
the models of :mod:`lpm_node.core.audit` and acts through the same functions as the command line.
"""
