import sys

from hrmspec.cli import main

sys.exit(main())
