import sys

from medalloy.cli import main

sys.exit(main())
