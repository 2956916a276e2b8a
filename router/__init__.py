"""tensorcache.router: the control plane (ring snapshots, membership)."""
