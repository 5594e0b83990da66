import sys

from sinkfix.cli import main

sys.exit(main())
