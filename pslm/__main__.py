import sys

from pslm.cli import main

sys.exit(main())
