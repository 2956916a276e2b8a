import sys

from tensorcache import parentdeath

parentdeath.from_env()  # before anything else: a launcher's child dies with it

from tensorcache.cli import main  # noqa: E402

sys.exit(main())
