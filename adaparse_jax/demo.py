"""`make demo`: build (or reuse) a synthetic zoo, train AdaParse / RE-Net / Random G.T. on every
fold, and print the held-out tables with honest scoring.

    python -m adaparse_jax.demo                                 # configs/demo.py
    python -m adaparse_jax.demo --config configs/demo.py --config.workdir=runs/demo2

What runs, where it goes and what the output means: configs/demo.py's docstring. The pieces are
library calls: `zoo.build_zoo` (the zoo), `training.train` (one run per method, fold, training
seed (`config.seeds`) and Random-G.T. seed, each in its own workdir, resumable),
`evaluation.evaluate` (the papers' per-fold tables and confusion matrices), `scoring.score_runs`
(pooled held-out scores, p-values, ensembles of training seeds).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ml_collections

from adaparse_jax import atomic, demo_config, evaluation, models, reporting, scoring, zoo
from adaparse_jax import train as training
from adaparse_jax.data import re116
from adaparse_jax.zoo import probe as zoo_probe
from adaparse_jax.zoo import settings as zoo_settings
from adaparse_jax.zoo import worker as zoo_worker

DEFAULT_CONFIG = Path(demo_config.__file__)  # configs/demo.py re-exports it
# What `config.recipe_train.<recipe>` may set for that recipe's runs (train.optimizer.learning_rate,
# train.num_epochs, and the training seeds of its methods in place of config.seeds).
RECIPE_TRAIN_FIELDS = ("learning_rate", "num_epochs", "seeds")
ZOO_DIR, CACHE_DIR, RUNS_DIR, RESULTS_DIR, XLA_CACHE_DIR = "zoo", "cache", "runs", "results", "xla_cache"
log = logging.getLogger("adaparse_jax.demo")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the demo: a method on one fold (and one Random-G.T. seed)."""

    arch: str
    fold: str
    random_gt_seed: int | None  # None: true labels
    workdir: Path
    recipe: str = "official"
    seed: int | None = None  # the training seed; None: config.train.seed

    @property
    def name(self) -> str:
        c = ml_collections.ConfigDict({"label": "", "random_gt": self.random_gt_seed is not None,
                                       "model": {"arch": self.arch}, "recipe": self.recipe})
        seed = "" if self.random_gt_seed is None else f" seed {self.random_gt_seed}"
        seed += "" if self.seed is None else f" training seed {self.seed}"
        return f"{training.run_label(c)}{seed}, fold {self.fold}"


def zoo_dir(config: ml_collections.ConfigDict) -> Path:
    return Path(config.workdir) / ZOO_DIR


def build_zoo(config: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
    """Build, resume or reuse the configured zoo in <workdir>/zoo; returns its manifest.

    A finished zoo built with other settings (e.g. by an earlier version of the zoo's code) is
    rebuilt, unless config.zoo.keep_existing: then it is used as it is, with a warning naming both
    settings hashes (for long benchmarks whose zoo took hours; the report records the hash).
    """
    z = config.zoo
    overrides = {k: int(z[k]) for k in ("generators", "images") if z.get(k)}  # 0: the size's own
    zoo_config = zoo.zoo_config(z.size, seed=z.seed, trained=z.trained, **overrides)
    manifest_path = zoo_dir(config) / "manifest.json"
    if z.keep_existing and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        current = zoo_settings.settings_hash(zoo_settings.settings_of(zoo_config))
        if manifest.get("settings_hash") != current:
            log.warning("zoo %s was built with settings %s, the current code and config give %s; "
                        "kept as it is (config.zoo.keep_existing)", zoo_dir(config),
                        manifest.get("settings_hash"), current)
        return manifest
    return zoo.build_zoo(zoo_dir(config), zoo_config, workers=z.workers or None, progress=progress,
                         compilation_cache=Path(config.workdir).resolve() / XLA_CACHE_DIR)


def folds_of(config: ml_collections.ConfigDict) -> list[str]:
    """The folds to run: config.folds, or every test split of the zoo."""
    available = list(re116.load_dataset(zoo_dir(config)).test_splits)
    folds = [str(f) for f in config.folds] or available
    unknown = [f for f in folds if f not in available]
    if unknown:
        raise ValueError(f"config.folds: {unknown} are not folds of the zoo in {zoo_dir(config)} "
                         f"(it has {available})")
    return folds


def parse_method(spec: str) -> tuple[str, str]:
    """'adaparse' -> ('adaparse', 'official'); 'renet:improved' -> ('renet', 'improved')."""
    arch, _, recipe = str(spec).partition(":")
    recipe = recipe or "official"
    if arch not in models.ARCHS or recipe not in training.RECIPES:
        raise ValueError(f"config.methods entry {spec!r}: expected ARCH[:RECIPE] with ARCH one of "
                         f"{models.ARCHS} and RECIPE one of {tuple(training.RECIPES)}")
    return arch, recipe


def plan(config: ml_collections.ConfigDict, folds: Sequence[str]) -> list[Run]:
    """Every run of the demo, methods first (seed-major), then Random G.T. (fold-major within each).

    config.seeds (or, when not (), config.recipe_train.<recipe>.seeds for that recipe's methods): the
    training seeds (one k-fold replicate each, scored also as their ensemble,
    `scoring.score_runs`); () is config.train.seed alone. The run of seed config.train.seed keeps
    the directory it has without seeds; the others are <stem>_seed<S>_fold<F>.
    """
    runs_dir = Path(config.workdir).resolve() / RUNS_DIR
    base_seed = int(config.train.seed)

    def seeds_of(recipe):
        field = f"recipe_train.{recipe}.seeds"
        given = tuple(config.recipe_train.get(recipe, {}).get("seeds", ()))
        if not given:
            field, given = "seeds", tuple(config.seeds)
        seeds = [int(s) for s in given] or [base_seed]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"config.{field}: {tuple(given)} repeats a seed")
        return seeds

    def stem(arch, recipe):  # official runs keep the names they had before recipes existed
        return arch if recipe == "official" else f"{arch}_{recipe}"

    def seeded(s):
        return "" if s == base_seed else f"_seed{s}"

    runs = [Run(arch, f, None, runs_dir / f"{stem(arch, recipe)}{seeded(s)}_fold{f}", recipe,
                None if s == base_seed else s)
            for arch, recipe in map(parse_method, config.methods) for s in seeds_of(recipe) for f in folds]
    runs += [Run(arch, f, seed, runs_dir / f"{stem(arch, recipe)}_random_gt{seed}_fold{f}", recipe)
             for arch, recipe in map(parse_method, config.random_gt_methods)
             for seed in config.random_gt_seeds for f in folds]
    return runs


def recipe_overrides(config: ml_collections.ConfigDict) -> list[str]:
    """`config.recipe_overrides` ("GROUP.FIELD=VALUE ...") as the command-line overrides of
    config.train it names ('--config.GROUP.FIELD=VALUE'), checked against config.train's fields and
    types as `train.apply_overrides` checks them. Raises ValueError naming the bad entry."""
    out = []
    for entry in str(config.recipe_overrides).split():
        path = entry.partition("=")[0]
        group = path.partition(".")[0]
        arg = f"--config.{entry}"
        if "=" not in entry or not isinstance(config.train.get(group), ml_collections.ConfigDict):
            raise ValueError(f"config.recipe_overrides entry {entry!r}: expected GROUP.FIELD=VALUE with "
                             f"GROUP.FIELD a field of config.train (e.g. model.parser_pool=flatten)")
        try:
            training.apply_overrides(config.train, [arg])
        except training.ConfigError as e:
            raise ValueError(f"config.recipe_overrides entry {entry!r}: {e}") from e
        out.append(arg)
    return out


def train_config(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
    """The `adaparse_jax.train` config of one run: config.train with the run's architecture, recipe (and
    its learning rate and epochs from `config.recipe_train`, then `config.recipe_overrides` on a
    recipe other than 'official'), fold, labels and the demo's shared zoo, cache and compilation
    cache."""
    workdir = Path(config.workdir).resolve()
    t = ml_collections.ConfigDict(config.train.to_dict())
    t.model.arch = run.arch  # the demo width is the same for both architectures
    overrides = recipe_overrides(config)
    training.apply_recipe(t, run.recipe)
    if run.recipe != "official":
        t = training.apply_overrides(t, overrides)
    per_recipe = config.recipe_train.to_dict()
    unknown = sorted(set(per_recipe) - set(training.RECIPES))
    if unknown:
        raise ValueError(f"config.recipe_train: unknown recipe(s) {unknown}; expected some of "
                         f"{tuple(training.RECIPES)}")
    for field, value in per_recipe.get(run.recipe, {}).items():
        if field not in RECIPE_TRAIN_FIELDS:
            raise ValueError(f"config.recipe_train.{run.recipe}.{field}: not a field a recipe's runs "
                             f"may set here; expected some of {RECIPE_TRAIN_FIELDS}")
        if field == "learning_rate":
            t.optimizer.learning_rate = float(value)
        elif field == "seeds":
            continue  # `plan` made one run per seed; the run carries its seed
        else:
            t[field] = int(value)
    t.data.dataset = str(workdir / ZOO_DIR)
    t.data.cache = str(workdir / CACHE_DIR)
    t.split = int(run.fold) if run.fold.isdigit() else run.fold
    t.random_gt = run.random_gt_seed is not None
    t.random_gt_seed = run.random_gt_seed or 0
    if run.seed is not None:
        t.seed = run.seed
    t.compilation_cache = str(workdir / XLA_CACHE_DIR)
    return t


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timer:
    """Wall and CPU seconds (this process and its finished children) of named phases."""

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}
        self._t0, self._c0 = time.perf_counter(), _cpu_seconds()

    def phase(self, name: str, start: tuple[float, float]) -> None:
        self.phases[name] = {"wall_s": time.perf_counter() - start[0], "cpu_s": _cpu_seconds() - start[1]}

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), _cpu_seconds()

    def total(self) -> dict[str, float]:
        return {"wall_s": time.perf_counter() - self._t0, "cpu_s": _cpu_seconds() - self._c0}


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def _train_in_worker(config_dict: dict, run: Run) -> dict:
    """One run in a worker process (single-threaded XLA, see `train_runs`)."""
    config = ml_collections.ConfigDict(config_dict)
    logging.getLogger("adaparse_jax").setLevel(logging.INFO)  # the run's train.log, as in-process
    return _train_one(config, run, progress=False)


def _train_one(config: ml_collections.ConfigDict, run: Run, *, progress: bool) -> dict:
    t0 = time.perf_counter()
    tc = train_config(config, run)
    tc.progress = progress
    summary = training.train(tc, run.workdir)
    if summary["finished"] and tc.eval_at_end:
        result = evaluation.evaluate_run(run.workdir)
        summary.update(selected_step=result["step"], selection=result["selection"])
    return {"run": run.name, "workdir": str(run.workdir), "wall_s": time.perf_counter() - t0,
            **{k: summary.get(k) for k in ("step", "selected_step", "selection", "compile_s")}}


def _cost_order(runs: Sequence[Run]) -> list[int]:
    """Indices of `runs`, the expensive architecture first (a shorter tail on a worker pool)."""
    return sorted(range(len(runs)), key=lambda i: runs[i].arch != "adaparse")


def train_runs(config: ml_collections.ConfigDict, runs: Sequence[Run], *, progress: bool = True,
               echo: Callable[[str], None] = print) -> list[dict]:
    """Train (or resume, or reuse) every run; returns one summary per run, in the order of `runs`.

    config.workers > 1 trains that many runs at once, each in a spawned process with
    single-threaded XLA (`zoo.settings.WORKER_ENV`): on the project's 2-core CPU two such processes
    delivered 1.4x the images per second of one process using both cores (demo AdaParse, batch 16:
    2 x 17.0 vs 24.0 img/s). Every process shares the demo's persistent compilation cache.
    """
    summaries: list[dict | None] = [None] * len(runs)

    def done(i: int, summary: dict) -> None:
        summaries[i] = summary
        finished = sum(s is not None for s in summaries)
        echo(f"[demo] {finished}/{len(runs)} {summary['run']}: {summary['step']} steps, evaluated "
             f"step {summary.get('selected_step')} ({summary['wall_s']:.0f} s)")

    workers = min(int(config.workers), len(runs))
    if workers <= 1:
        for i in range(len(runs)):
            done(i, _train_one(config, runs[i], progress=progress))
        return summaries
    env = dict(zoo_settings.WORKER_ENV)
    with zoo_worker.worker_environment(env), concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_worker, config.to_dict(), runs[i]): i for i in _cost_order(runs)}
        try:
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    done(i, future.result())
                except Exception as e:
                    raise RuntimeError(f"demo run {runs[i].name} ({runs[i].workdir}) failed: {e}; "
                                       f"its log: {runs[i].workdir / 'train.log'}") from e
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # finished runs stay reusable
            raise
    return summaries


def papers_runs(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> list[Run]:
    """The runs of the papers' per-fold tables, one per method and fold: each method's first
    training seed and each Random G.T. method's first seed (`evaluation.evaluate` takes one run per
    label and split)."""
    first: dict[tuple, int | None] = {}
    for r in runs:
        if r.random_gt_seed is None:
            first.setdefault((r.arch, r.recipe), r.seed)
    first_rgt = set(config.random_gt_seeds[:1])
    return [r for r in runs if (r.random_gt_seed is None and r.seed == first[(r.arch, r.recipe)])
            or r.random_gt_seed in first_rgt]


def score(config: ml_collections.ConfigDict, runs: Sequence[Run], out: Path) -> dict:
    """The papers' per-fold tables (`evaluation.evaluate` of `papers_runs`) and the honest scores
    of all runs (`scoring.score_runs`), with their files in `out`."""
    papers = evaluation.evaluate([r.workdir for r in papers_runs(config, runs)], out)
    report = scoring.score_runs([r.workdir for r in runs], n_resamples=config.n_resamples)
    files = {**papers["files"], **reporting.write_scores(report, out)}
    if config.plots:
        files["scores_plot"] = str(reporting.plot_scores(report, out / "scores.png"))
    result = {"report": report, "goals": {}, "files": files, "probe": None, "probe_goals": {}}
    if config.probe:
        result["probe"] = zoo_probe.probe(zoo_dir(config), n_resamples=config.n_resamples)
        atomic.write_text(out / "probe.json", json.dumps(result["probe"], indent=1))
        files["probe"] = str(out / "probe.json")
        result["probe_goals"] = probe_goals(report, result["probe"])
    result["goals"] = scoring.goals_b(report, result["probe"])
    return result


def probe_goals(report: Mapping, probe: Mapping) -> dict:
    """`scoring.probe_goal` for every method trained on true labels: its recipe's Random G.T. runs
    and the official recipe of its architecture (when the demo ran them) are the comparisons."""
    labels = {m["label"] for m in report["methods"]}
    goals = {}
    for m in report["methods"]:
        if m["random_gt"]:
            continue
        official = m.get("ensemble_of", m["label"]).split(" (")[0]
        rgt = scoring.random_gt_label(m)
        goals[m["label"]] = scoring.probe_goal(
            report, m["label"], probe, official=official if official in labels else None,
            random_gt=rgt if rgt in labels else None)
    return goals


def run_demo(config: ml_collections.ConfigDict, *, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """The whole demo (see the module docstring). Returns the scoring report, the goal checks,
    the file paths and the timings (also written to <workdir>/results/demo.json)."""
    workdir = Path(config.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    start = timer.now()
    echo(f"[demo] zoo: {config.zoo.size} size, seed {config.zoo.seed}, in {zoo_dir(config)}")
    manifest = build_zoo(config, progress=progress)
    timer.phase("zoo", start)
    echo(f"[demo] zoo ready: {manifest['num_generators']} generators x "
         f"{manifest['images_per_generator']} images ({_minutes(timer.phases['zoo']['wall_s'])})")
    runs = plan(config, folds_of(config))
    start = timer.now()
    # Decode the zoo into the cache here, once, before runs (maybe in parallel) read it.
    training.setup_data(train_config(config, runs[0]), progress=progress)
    timer.phase("prepare", start)
    start = timer.now()
    summaries = train_runs(config, runs, progress=progress, echo=echo)
    timer.phase("train", start)
    start = timer.now()
    results = workdir / RESULTS_DIR
    out = score(config, runs, results)
    timer.phase("score", start)
    out["timings"] = {"phases": timer.phases, "total": timer.total(), "runs": summaries}
    out["config"] = config.to_dict()
    out["zoo"] = {"directory": str(zoo_dir(config)), "settings_hash": manifest.get("settings_hash")}
    (results / "demo.json").write_text(json.dumps(out, indent=1, default=str))

    echo("")
    echo(reporting.scores_markdown(out["report"], probe=out["probe"]))
    if out["probe_goals"]:
        echo("Goal (a): at least the spectral probe on every attribute it reads at p < 0.01, "
             "up-sampling >= 0.85, above Random G.T. on the mean discrete F1, loss groups at least "
             "the official recipe's (generator level, pooled held-out):")
        for g in out["probe_goals"].values():
            echo(reporting.probe_goal_line(g))
        echo("")
    for g in out["goals"].values():
        echo("Goal (b): " + reporting.goal_markdown(g))
        echo("")
    t = out["timings"]["total"]
    echo(f"[demo] total {_minutes(t['wall_s'])} wall, {_minutes(t['cpu_s'])} CPU ("
         + ", ".join(f"{k} {_minutes(v['wall_s'])}" for k, v in timer.phases.items())
         + f"); files in {results}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m adaparse_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="config file (default: adaparse_jax/demo_config.py, = configs/demo.py)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unknown arguments {bad}; overrides look like --config.workdir=runs/demo2")
    try:
        config = training.load_config(args.config, overrides)
    except training.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The demo's own progress at INFO, the libraries' (Orbax, grain, absl) from WARNING up.
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING,
                        force=True)
    logging.getLogger("adaparse_jax").setLevel(logging.INFO)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    run_demo(config, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
