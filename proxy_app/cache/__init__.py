"""The response cache: HTTP caching policy, the Redis-backed CacheService and the proxy's use of
them."""
