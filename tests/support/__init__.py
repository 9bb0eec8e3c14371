"""Helpers that test fixtures build on (conftest.py holds the fixtures themselves)."""
