"""Prometheus metrics of the serving front-end (`/metrics`)."""
