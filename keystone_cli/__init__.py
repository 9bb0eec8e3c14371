"""The ``keystone`` command line (may import every Keystone package; nothing imports it)."""
