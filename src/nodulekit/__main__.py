import sys

from nodulekit.cli import main

sys.exit(main())
