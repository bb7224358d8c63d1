"""Generated from protos/jitgate/v1 by `make protos`; do not edit."""
