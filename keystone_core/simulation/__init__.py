"""Simulated Axon devices and episodes (tests, load generation, demos)."""
