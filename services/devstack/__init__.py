"""The local stack: dev PKI, embedded Redis, dev OIDC issuer, launcher and demo."""
