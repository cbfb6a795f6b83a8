"""Who may use the proxy: client API keys, their per-key rate limit, and the check in front of
``/api/v1`` that applies both in one Redis round trip."""
