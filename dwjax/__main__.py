import sys

from dwjax.cli import main

sys.exit(main())
