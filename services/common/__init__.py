"""What every jitgate service shares: errors, mTLS identity, config, keys, serving."""
