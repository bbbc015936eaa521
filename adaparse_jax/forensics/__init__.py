"""Forensics beyond parsing, on a trained run (AdaParse Tables XI-XII, RE-Net's applications).

  python eval.py --workdir RUN --perturb jpeg:75 fgsm:2 --out DIR         robustness (`robustness`)
  python -m adaparse_jax.forensics attribute --workdir RUN --out DIR       generator attribution
  python -m adaparse_jax.forensics detect --workdir RUN --out DIR          real vs generated
  python -m adaparse_jax.forensics pairs --workdir RUN --out DIR           same-source verification

`tasks` holds attribution, detection and verification, `features` the frozen features they read,
`robustness` the perturbed evaluation (perturbations themselves: `adaparse_jax.perturb`). docs/FORENSICS.md
explains every table.
"""
