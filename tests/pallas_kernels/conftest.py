"""GPU interpret mode needs more XLA:CPU client threads than a 2-core box has.

Each simulated warpgroup is its own XLA:CPU computation, and one blocked on a
barrier holds a client thread; XLA sizes that pool from `$NPROC` (default: the
core count), so it must be raised before the CPU backend starts.
"""

import os

os.environ.setdefault("NPROC", "8")
