"""``python -m fonana_ws``: the same as the ``fonana-ws`` command."""

from fonana_ws_cli.main import main

main()
