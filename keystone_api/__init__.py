"""Keystone's HTTP API (FastAPI): quick work only, every route authenticated and role-listed."""
