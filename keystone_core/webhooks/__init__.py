"""Webhook wire format shared by the sender and receivers (signing and verification)."""
