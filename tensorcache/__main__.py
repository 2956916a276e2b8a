import sys

from tensorcache.cli import main

sys.exit(main())
