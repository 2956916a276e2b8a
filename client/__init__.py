"""tensorcache.client: the library a worker imports (see tensorcache.connect)."""
