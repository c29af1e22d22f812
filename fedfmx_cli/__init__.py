"""The `fedfmx-edge` command line: a thin typer layer over the services and the core."""
