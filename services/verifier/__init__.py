"""The OIDC relying party: access tokens in, signed identity assertions out."""
