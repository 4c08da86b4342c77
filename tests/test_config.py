"""Job files and overrides: every shipped job validates; bad keys and values name the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import CLI, ROOT, cli_env
from emergence_ray.config import JobConfig, load_config
from emergence_ray.errors import ConfigError

JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_jobs_folder_has_jobs():
    assert len(JOBS) >= 2


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_file_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    if cfg.tune is not None:
        from emergence_ray.tune import TuneSection

        TuneSection.model_validate(cfg.tune)


def test_defaults_are_the_builtin_digits_job():
    cfg = load_config(None)
    assert cfg.data.source == "digits" and cfg.scaling.num_workers == 2
    # jobs/digits.yaml spells out the same defaults
    assert load_config(ROOT / "jobs" / "digits.yaml").model_dump() == cfg.model_dump()


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "train.epochs=5", "scaling.use_gpu=true", "data.image_size=16"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 5 and cfg.scaling.use_gpu is True and cfg.data.image_size == 16


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("nonsense.key=1", "nonsense"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.name=lion", "optim.name"),
    ("model.name=vgg99", "model.name"),
    ("data.source=csv", "data.source"),
    ("train.epochs=zero", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("data.source=imagefolder", "data.path"),
    ("run.name=../escape", "run.name"),
])
def test_bad_keys_and_values_name_the_key(override: str, key: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["optim.lr"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_bad_value_without_traceback(tmp_path):
    proc = subprocess.run([*CLI, "train", "--set", "optim.lr=0", "--set", f"run.storage_path={tmp_path}"],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_validate_every_job():
    proc = subprocess.run([*CLI, "validate", *map(str, JOBS)], capture_output=True, text=True, env=cli_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ok") == len(JOBS)


def _documented_commands() -> list[list[str]]:
    """Every `emergence-ray ...` / `python -m emergence_ray ...` command in README.md and jobs/README.md."""
    import shlex

    commands = []
    for doc in (ROOT / "README.md", ROOT / "jobs" / "README.md", ROOT / "cluster" / "README.md"):
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            for marker in ("emergence-ray ", "python -m emergence_ray "):
                if marker in line and not line.lstrip().startswith(("|", "#", "`emergence-ray validate")):
                    cmd = line[line.index(marker) + len(marker):].split("#")[0].split("`")[0].strip()
                    words = shlex.split(cmd)
                    if words and words[0] in ("train", "tune", "evaluate", "predict"):
                        commands.append(words)
    return commands


def test_every_documented_command_parses_and_its_job_validates():
    """The heavy runs are in the e2e/cluster tests; here every documented command line is parsed
    by the real CLI parser and its job (config file + --set) validated."""
    from emergence_ray.cli import parser

    commands = _documented_commands()
    assert len(commands) >= 8
    for words in commands:
        args = parser().parse_args(words)
        if args.command in ("train", "tune"):
            cfg = load_config(ROOT / args.config if args.config else None, args.overrides)
            if args.command == "tune":
                from emergence_ray.tune import tune_section

                tune_section(cfg)
