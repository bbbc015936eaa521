"""Config machinery: every config file loads and validates, overrides, clear errors, saved configs,
what may change when a run resumes. No training here."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from adaparse_jax import models
from adaparse_jax import train as training

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    # Config files may import each other (`from configs import re116`), as under train.py.
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_file_loads_and_validates(path):
    config = training.load_config(str(path))
    if path.stem == "demo":  # the demo's runs are configured by its `train` field
        config = config.train
    training.validate_config(config)
    doc = path.read_text().split('"""')[1]
    assert "python train.py" in doc or "make demo" in doc  # the docstring gives the command
    if path.stem not in ("demo", "tiny"):  # smoke-test schedules: see their docstrings
        assert config.optimizer.learning_rate == 1e-4 and config.optimizer.weight_decay == 1e-4
        assert config.batch_size == 16 and config.loss.prediction_weight == 10.0


def test_paper_settings_of_the_re116_configs():
    ada = training.load_config(str(ROOT / "configs/re116.py"))
    assert ada.num_epochs == 20 and ada.model.arch == "adaparse" and ada.class_weights == "official"
    assert (ada.model.code_dim, ada.model.hidden_dim, ada.model.source_block, ada.model.inject_block) == (
        256, 2048, 5, 10)
    assert models.param_counts(ada.model) == {"fen": 150_778_499, "parser": 4_079_605}
    renet = training.load_config(str(ROOT / "configs/renet_re116.py"), ["--config.split=3"])
    assert renet.model.arch == "renet" and renet.split == 3 and renet.data.images == ada.data.images
    assert training.load_config(str(ROOT / "configs/re124.py")).data.variant == "re123"
    assert training.load_config(str(ROOT / "configs/re116.py") + ":4").split == 4


def test_overrides_reach_nested_fields_and_keep_types():
    config = training.load_config(str(ROOT / "configs/re116.py"),
                                   ["--config.split=2", "--config.model.fusion=add",
                                    "--config.random_gt=True", "--config.optimizer.learning_rate=3e-4"])
    assert (config.split, config.model.fusion, config.random_gt) == (2, "add", True)
    assert config.optimizer.learning_rate == 3e-4
    with pytest.raises(training.ConfigError, match="split"):
        training.load_config(str(ROOT / "configs/re116.py"), ["--config.split=two"])


def test_apply_overrides_parses_as_the_command_line_and_leaves_the_config_alone():
    config = training.load_config(str(ROOT / "configs/re116.py"))
    before = config.to_dict()
    out = training.apply_overrides(config, ["--config.model.parser_pool=flatten",
                                            "--config.loss.constraint_scale=1", "--config.random_gt=false"])
    assert (out.model.parser_pool, out.loss.constraint_scale, out.random_gt) == ("flatten", 1.0, False)
    assert isinstance(out.loss.constraint_scale, float)
    assert config.to_dict() == before  # a copy: the argument is unchanged
    # the same parsing as a config file's overrides
    assert out.to_dict() == training.load_config(str(ROOT / "configs/re116.py"), [
        "--config.model.parser_pool=flatten", "--config.loss.constraint_scale=1", "--config.random_gt=false"]).to_dict()
    for bad, match in ((["--config.model.width=2.5"], "width=2.5"),
                       (["--config.model.widht=8"], "did you mean 'model.width'"),
                       (["model.width=8"], "expected --config.FIELD=VALUE"), (["--config.random_gt=maybe"], "maybe")):
        with pytest.raises(training.ConfigError, match=match):
            training.apply_overrides(config, bad)


def test_unknown_fields_are_errors_that_list_the_valid_ones():
    with pytest.raises(training.ConfigError, match=r"unknown config field 'spilt'; did you mean 'split'"
                                                    r"(?s:.*)valid fields of config: batch_size, "):
        training.load_config(str(ROOT / "configs/tiny.py"), ["--config.spilt=2"])
    with pytest.raises(training.ConfigError, match=r"'data\.cahce'(?s:.*)valid fields of data: .*cache"):
        training.load_config(str(ROOT / "configs/tiny.py"), ["--config.data.cahce=/tmp/x"])
    with pytest.raises(training.ConfigError, match=r"'split' is not a group of fields"):
        training.load_config(str(ROOT / "configs/tiny.py"), ["--config.split.x=1"])
    with pytest.raises(training.ConfigError, match="unknown option"):
        training.load_config(str(ROOT / "configs/tiny.py") + ":renot")


@pytest.mark.parametrize("field, value, message", [
    ("class_weights", "test", "class_weights='test'; expected one of"),
    ("data.loader", "gpu", "data.loader='gpu'; expected one of"),
    ("batch_size", 0, "batch_size=0; expected a positive integer"),
    ("devices", -1, "devices=-1; expected an integer >= 0"),
    ("selection_mode", "best", "selection_mode='best'"),
    ("model.fusion", "mul", "config.model: config field fusion='mul'"),
    ("distributed.num_processes", 0, "distributed.num_processes=0; expected a positive integer"),
    ("distributed.process_id", -1, "distributed.process_id=-1; expected an integer >= 0"),
    ("distributed.coordinator_address", "node0", "distributed.coordinator_address='node0'; expected 'host:port'"),
    ("distributed.coordinator_address", "node0:99999", "coordinator_address='node0:99999'"),
    ("distributed.local_device_ids", (0, 0), "distributed.local_device_ids=(0, 0); expected distinct"),
])
def test_invalid_values_name_the_field(field, value, message):
    config = training.default_config()
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(training.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        training.validate_config(config)


def test_missing_dataset_is_a_clear_error(tmp_path):
    config = training.resolve_paths(training.default_config(), tmp_path)
    with pytest.raises(training.ConfigError, match="no dataset; set data.dataset"):
        training.setup_data(config)


def test_saved_config_round_trips_and_resume_allows_only_harmless_changes(tmp_path):
    config = training.resolve_paths(training.load_config(str(ROOT / "configs/tiny.py") + ":renet"), tmp_path)
    training.check_and_save_config(config, tmp_path)
    saved = training.load_saved_config(tmp_path)
    training.validate_config(saved)
    assert json.loads(saved.to_json()) == json.loads(config.to_json())
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # a run with a checkpoint
    more = training.load_saved_config(tmp_path)
    more.num_epochs, more.max_steps, more.data.loader = 9, 4, "device"
    training.check_and_save_config(more, tmp_path)  # may continue
    other = training.load_saved_config(tmp_path)
    other.seed = 7
    with pytest.raises(training.ConfigError, match=r"another config:\n  seed: saved 0, now 7"):
        training.check_and_save_config(other, tmp_path)
    wider = training.load_saved_config(tmp_path)
    wider.model.width = 16
    with pytest.raises(training.ConfigError, match=r"different model:\n  model\.width: saved 8, now 16"):
        training.check_and_save_config(wider, tmp_path)


def test_run_labels_come_from_arch_and_random_gt():
    config = training.default_config()
    assert training.run_label(config) == "AdaParse"
    config.model.arch = "renet"
    assert training.run_label(config) == "RE-Net"
    config.random_gt = True
    assert training.run_label(config) == "Random G.T. (RE-Net)"
    config.label = "RE-Net, add fusion"
    assert training.run_label(config) == "RE-Net, add fusion"


def test_generate_choices_name_the_zoo_sizes():
    from adaparse_jax import zoo

    zoo_kinds = {g.split(":", 1)[1] for g in training.GENERATE if g.startswith("zoo:")}
    assert zoo_kinds == set(zoo.SIZES)


def test_selection_metric_is_checked_before_training():
    config = training.load_config(str(ROOT / "configs/tiny.py"))
    config.selection_metric = "f1/flag_mean"  # typo of f1/flags_mean
    with pytest.raises(training.ConfigError,
                       match=r"selection_metric='f1/flag_mean' is not a validation metric; did you mean "
                             r"'f1/flags_mean'\?"):
        training.validate_config(config)
    config.selection_metric = "l1/continuous_mean"  # an error: the best checkpoint is the smallest
    with pytest.raises(training.ConfigError, match=r"selection_mode='max' would select the checkpoint "
                                                   r"with the largest error 'l1/continuous_mean'"):
        training.validate_config(config)
    config.selection_mode = "min"
    training.validate_config(config)
    for name in ("score", "f1/flags_mean", "acc/skip"):
        config.selection_metric, config.selection_mode = name, "max"
        training.validate_config(config)


def test_fused_unroll_field_resolves_per_backend():
    config = training.default_config()
    assert config.fused_unroll == "auto"
    assert training.fused_unroll(config) is (jax.default_backend() == "cpu")
    config.fused_unroll = "rolled"
    assert training.fused_unroll(config) is False
    config.fused_unroll = "unrolled"
    assert training.fused_unroll(config) is True
    config.fused_unroll = "sometimes"
    with pytest.raises(training.ConfigError, match=r"fused_unroll='sometimes'; expected one of"):
        training.validate_config(config)


def test_ci_turns_a_missing_reference_into_a_failure(monkeypatch):
    from conftest import skip_or_fail

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="gone"):
        skip_or_fail("gone")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"gone \(CI=true: required\)"):
        skip_or_fail("gone")


def test_distributed_settings_from_the_config_and_the_environment(monkeypatch):
    monkeypatch.delenv(training.DISTRIBUTED_ENV, raising=False)
    config = training.default_config()
    assert training.distributed_settings(config) is None  # off by default: one process
    assert training.init_distributed(config) is False
    d = config.distributed
    d.coordinator_address, d.num_processes, d.process_id = "node0:1234", 2, 1
    assert training.distributed_settings(config) == {
        "coordinator_address": "node0:1234", "num_processes": 2, "process_id": 1}
    d.local_device_ids = (0, 1)
    assert training.distributed_settings(config)["local_device_ids"] == [0, 1]
    d.process_id = 2
    with pytest.raises(training.ConfigError, match=r"distributed\.process_id=2; expected an integer below "
                                                   r"distributed\.num_processes=2"):
        training.validate_config(config)
    d.process_id = 1
    auto = training.default_config()
    auto.distributed.auto = True
    assert training.distributed_settings(auto) == {}  # jax.distributed.initialize() with no arguments
    auto.distributed.num_processes = 4
    with pytest.raises(training.ConfigError, match=r"distributed\.auto=True takes every setting from the "
                                                   r"launcher's environment; leave distributed\.num_processes"):
        training.distributed_settings(auto)
    partial = training.default_config()
    partial.distributed.process_id = 0
    with pytest.raises(training.ConfigError, match=r"distributed\.process_id is set but "
                                                   r"distributed\.coordinator_address is not"):
        training.distributed_settings(partial)
    monkeypatch.setenv(training.DISTRIBUTED_ENV, "auto")
    assert training.distributed_settings(training.default_config()) == {}
    with pytest.raises(training.ConfigError, match="ADAPARSE_DISTRIBUTED=auto takes every setting"):
        training.distributed_settings(config)
    monkeypatch.setenv(training.DISTRIBUTED_ENV, "slurm")
    with pytest.raises(training.ConfigError, match=r"ADAPARSE_DISTRIBUTED='slurm'; expected 'auto'"):
        training.validate_config(training.default_config())


def test_distributed_overrides_and_saved_configs(tmp_path, monkeypatch):
    monkeypatch.delenv(training.DISTRIBUTED_ENV, raising=False)
    config = training.load_config(str(ROOT / "configs/tiny.py"), [
        "--config.distributed.coordinator_address=10.0.0.1:7777", "--config.distributed.num_processes=8",
        "--config.distributed.process_id=3", "--config.distributed.local_device_ids=0,1"])
    assert training.distributed_settings(config) == {
        "coordinator_address": "10.0.0.1:7777", "num_processes": 8, "process_id": 3,
        "local_device_ids": [0, 1]}
    config = training.resolve_paths(config, tmp_path)
    training.check_and_save_config(config, tmp_path)
    saved = training.load_saved_config(tmp_path)
    assert training.distributed_settings(saved)["local_device_ids"] == [0, 1]
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    other_host = training.load_saved_config(tmp_path)
    other_host.distributed.process_id, other_host.distributed.coordinator_address = 5, "10.0.0.2:7777"
    training.check_and_save_config(other_host, tmp_path, write=False)  # a resume may move hosts
    assert training.load_saved_config(tmp_path).distributed.process_id == 3  # write=False: unchanged
    # A workdir saved before the field existed reads as one process.
    old = json.loads((tmp_path / training.CONFIG_JSON).read_text())
    del old["distributed"]
    (tmp_path / training.CONFIG_JSON).write_text(json.dumps(old))
    assert training.distributed_settings(training.load_saved_config(tmp_path)) is None


def test_a_run_saved_before_the_schedule_fields_resumes_and_reads_as_constant(tmp_path):
    config = training.resolve_paths(training.load_config(str(ROOT / "configs/tiny.py")), tmp_path)
    training.check_and_save_config(config, tmp_path)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    old = json.loads((tmp_path / training.CONFIG_JSON).read_text())
    for field in training.ADDED_FIELDS:
        group, leaf = field.split(".")
        del old[group][leaf]
    (tmp_path / training.CONFIG_JSON).write_text(json.dumps(old))
    training.check_and_save_config(config, tmp_path, write=False)  # the same run: it may resume
    saved = training.load_saved_config(tmp_path)
    assert (saved.optimizer.schedule, saved.optimizer.warmup_steps) == ("constant", 0)
    config.optimizer.schedule = "cosine"  # another run: refused, naming the field
    with pytest.raises(training.ConfigError, match=r"optimizer.schedule: saved 'constant', now 'cosine'"):
        training.check_and_save_config(config, tmp_path, write=False)


def test_a_cosine_run_cannot_resume_with_other_epochs_a_constant_one_can(tmp_path):
    config = training.resolve_paths(training.load_config(str(ROOT / "configs/tiny.py")), tmp_path)
    config.optimizer.schedule = "cosine"
    training.check_and_save_config(config, tmp_path)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    config.num_epochs += 1  # the decay would end elsewhere: refused, naming the field
    with pytest.raises(training.ConfigError, match=r"num_epochs: saved \d+, now \d+"):
        training.check_and_save_config(config, tmp_path, write=False)
    constant = tmp_path / "constant"
    constant.mkdir()
    config = training.resolve_paths(training.load_config(str(ROOT / "configs/tiny.py")), constant)
    training.check_and_save_config(config, constant)
    (constant / "checkpoints" / "3").mkdir(parents=True)
    config.num_epochs += 1
    training.check_and_save_config(config, constant, write=False)  # constant rate: more epochs resume
