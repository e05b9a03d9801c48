"""Orchestration tasks: ``python -m tasks.run STAGE`` (what ``dvc.yaml`` calls), the DVC runner, the Prefect tasks."""
