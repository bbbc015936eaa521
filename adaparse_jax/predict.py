"""Alias of `python -m adaparse_jax.parse` (the former command name; same flags, same report).

    python -m adaparse_jax.predict --workdir runs/re116_s1 --folder my_images/ --out parsed.json
"""

from __future__ import annotations

import sys

from adaparse_jax.parse import main as _parse_main


def main(argv: list[str] | None = None) -> int:
    return _parse_main(argv, prog="python -m adaparse_jax.predict")


if __name__ == "__main__":
    sys.exit(main())
