"""`make demo`'s config: defined in the package (`adaparse_jax/demo_config.py`, whose docstring
says what runs and what the output means) so the package never reads this directory; re-exported
here for `--config configs/demo.py`."""

from adaparse_jax.demo_config import demo_model, get_config

__all__ = ["demo_model", "get_config"]
