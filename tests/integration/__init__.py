"""Integration tests: a real router and real nodes as child processes on 127.0.0.1."""
