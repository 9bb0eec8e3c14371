"""Keystone's asynchronous work as Dagster definitions (sensors, jobs, schedules, assets)."""
