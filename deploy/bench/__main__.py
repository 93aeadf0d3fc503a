"""``python -m deploy.bench``: the benchmark, or one of its child programs."""

import sys

from deploy.bench.orchestration import main

sys.exit(main())
