"""Real processes and servers for the tests: redis-server, a stub upstream, the gateway."""
