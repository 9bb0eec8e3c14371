"""Helpers shared by test fixtures."""
