"""Alias kept for `make bench`: `python -m bench.throughput` is `python -m bench`.

The throughput benchmark grew into the side-by-side benchmark in bench/run.py
(tensorcache next to Arrow Flight, Redis, a raw socket and memcpy); its
tensorcache rows measure what this module used to, with the same options.
"""

import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main())
