import sys

from posebert.cli import main

sys.exit(main())
