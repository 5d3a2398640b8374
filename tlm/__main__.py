"""`python -m tlm` is the same as the `tlm` command."""

from tlm.cli import main

main()
