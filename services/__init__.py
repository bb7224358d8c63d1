"""jitgate: just-in-time, least-scope access for AI agents."""

__version__ = "0.1.0"
