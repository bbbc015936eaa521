"""Why a run learns what it learns: gradient balance, Adam's damping, dead units, fingerprint probe.

  python -m adaparse_jax.diagnose --workdir runs/demo/runs/adaparse_fold1            # its checkpoint
  python -m adaparse_jax.diagnose --workdir RUN --step 300 --images 128 --out DIR
  python -m adaparse_jax.diagnose --config configs/tiny.py:zoo --dataset runs/zoo --out runs/diag0 \\
      --config.loss.constraint_scale=0.01              # a fresh initialisation, no training
  python -m adaparse_jax.diagnose --zoo runs/demo/zoo --runs 'runs/demo/runs/renet_improved_fold*'
                                                       # k-fold runs' fingerprints, held out

On a fixed, seeded sample of the run's training images (`--images`, drawn from the training
generators of its split, in batches of the run's batch size), with the run's labels (Random G.T.
runs: their permuted ones), class weights and loss config at the checkpoint's step, it reports:

1. **Loss terms and their gradients.** Every term of `losses.total_loss`, and the norm of its
   gradient (mean over the sample's batches: BatchNorm in training mode, as in a training step) on
   each parameter group (`PARAM_GROUPS`: AdaParse's extractor `fen/shared`, hypernetwork
   `fen/hypernet`, personalised blocks `fen/middle+adaptive` and `parser`; RE-Net's `fen` and
   `parser`), the norm over all parameters, and for the four constraints together and the 19
   cross-entropies together; then their ratio per group.
2. **Adam's effective step ratio** per group, from the checkpoint's optimiser state: per parameter,
   RMS over the sample's batches of the cross-entropies' gradient / (sqrt(v_hat) + eps): about 1
   when the parsing losses make up the gradient Adam normalises by (the parameter moves by about
   the learning rate); far below 1 when something else (the constraints, an early large gradient
   that beta2 still remembers) fills v_hat. Median and 10 / 90 % per group. Not available on a
   fresh initialisation (no second moments yet).
3. **Activations** in the same training-mode pass: for every layer whose output goes through a
   ReLU (`RELU_LAYERS`), the fraction of units (channels) never active on the sample and the
   fraction always active; for those and the parser's heads, the image-dependent spread: RMS over
   elements of the std across images / RMS of the mean across images (post-ReLU), and the std
   itself (for a head: how much its logits vary from image to image).
4. **A probe**: a logistic regression on `zoo.probe.spectral_features`, grouped k-fold by generator
   over the sample (`zoo.probe.held_out_decisions`, one image per unit), per discrete attribute the
   held-out macro F1 from the raw images and from the fingerprint the attribute's head reads
   (AdaParse: the target's own; RE-Net: the one), against the true labels.

Writes DIR/diagnose.md and DIR/diagnose.json (default DIR: <workdir>/diagnose, or
<workdir>/diagnose_step<N> with --step) and prints the Markdown. The checkpoint defaults to the
run's selected one (`checkpointing.selected_step`, as `runs.load` uses).

With `--zoo ZOO --runs RUN...` (one run per fold of the zoo, e.g. a method's runs in `make demo`)
it reports instead the zoo's spectral probe on held-out generators twice, on the images and on
the fingerprints each fold's run makes of them (`fingerprints.held_out_fingerprints`: generator-
and image-level macro F1 per attribute; `--channels rgb`, `--decide vote`; `--out DIR` writes
DIR/fingerprints.md and .json): whether the FEN keeps what the images carry.

Modules: `subject` (the run or fresh initialisation, the sample), `gradients` (1, 2), `activations`
(3), `probe` (4), `report` (`diagnose`, Markdown, JSON), `fingerprints` (the held-out probe of
k-fold runs), `cli` (`main`).
"""

from adaparse_jax.diagnose.activations import HEAD_LAYERS, RELU_LAYERS, activation_pass
from adaparse_jax.diagnose.cli import main
from adaparse_jax.diagnose.fingerprints import held_out_fingerprints, run_features, runs_by_fold
from adaparse_jax.diagnose.gradients import (
                                             ALL,
                                             CONSTRAINTS,
                                             CROSS_ENTROPIES,
                                             PARAM_GROUPS,
                                             TOTAL,
                                             adam_moments,
                                             adam_step_ratio,
                                             group_names,
                                             group_norms,
                                             group_of,
                                             term_gradients,
)
from adaparse_jax.diagnose.probe import PROBE_FOLDS, fingerprint_probe, probe_f1, probe_folds
from adaparse_jax.diagnose.report import JSON, MARKDOWN, diagnose, markdown, write_report
from adaparse_jax.diagnose.subject import (
                                             DiagnoseError,
                                             Subject,
                                             batches_of,
                                             initialise,
                                             load_checkpoint,
                                             sample_records,
)

__all__ = [
    "ALL", "CONSTRAINTS", "CROSS_ENTROPIES", "HEAD_LAYERS", "JSON", "MARKDOWN", "PARAM_GROUPS",
    "PROBE_FOLDS", "RELU_LAYERS", "TOTAL", "DiagnoseError", "Subject", "activation_pass",
    "adam_moments", "adam_step_ratio", "batches_of", "diagnose", "fingerprint_probe", "group_names",
    "group_norms", "group_of", "held_out_fingerprints", "initialise", "load_checkpoint", "main", "markdown", "probe_f1",
    "probe_folds", "run_features", "runs_by_fold", "sample_records", "term_gradients", "write_report",
]
