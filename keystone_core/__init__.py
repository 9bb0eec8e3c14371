"""Keystone core: settings, database, models, state machines, services, storage and QA.

This package imports neither FastAPI nor Dagster; the API and the pipelines are thin
layers over it.
"""
