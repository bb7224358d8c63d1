"""The agent-facing API: token in, one short-lived grant for one connection out."""
