"""Reference cloud receiver: the cloud side of Keystone's sync protocol (docs/sync.md)."""
