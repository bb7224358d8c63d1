"""Least-scope decisions: one group to one named connection, deny by default."""
