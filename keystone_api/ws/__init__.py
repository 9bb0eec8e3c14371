"""Device WebSocket channels (recorder; transfer follows)."""
