"""Prefect flows and deployments over the DVC pipeline (``python -m flows.serve``)."""
