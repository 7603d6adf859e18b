import sys

from streamvg.cli import main

sys.exit(main())
