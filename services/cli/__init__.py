"""The `jitgate` command: one verb per module, each adding its own sub-parser."""
