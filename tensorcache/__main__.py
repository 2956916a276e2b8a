import sys

from tensorcache.apps import parentdeath

parentdeath.from_env()  # before anything else: a launcher's child dies with it

from tensorcache.apps.cli import main  # noqa: E402

sys.exit(main())
