"""tensorcache.node: a cache node (byte-budgeted store + gRPC servicer)."""
