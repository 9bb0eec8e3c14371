"""Definitions grouped by concern."""
