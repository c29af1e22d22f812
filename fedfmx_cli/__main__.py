"""`python -m fedfmx_cli`: the same CLI as the `fedfmx-edge` script (used for child processes)."""

from fedfmx_cli.main import main

main()
