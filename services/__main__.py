"""`python -m jitgate` is the `jitgate` command."""

from jitgate.cli.main import main

main()
