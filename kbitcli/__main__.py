"""`python -m kbitcli` is the `kbit` command."""
from kbitcli.cli.main import entry

entry()
