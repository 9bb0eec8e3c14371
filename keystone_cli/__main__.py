"""``python -m keystone_cli`` — the same as the ``keystone`` console script."""

from keystone_cli.main import main

main()
