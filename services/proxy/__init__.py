"""The edge-zone PostgreSQL proxy: grants in, one upstream session out."""
