"""python -m adaparse_jax.diagnose (see the package docstring)."""

import sys

from adaparse_jax.diagnose.cli import main

sys.exit(main())
