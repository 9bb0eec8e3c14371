"""Episode quality checks (pure library: no FastAPI, no Dagster)."""
