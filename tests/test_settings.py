"""The settings of pslm train and finetune on the command line: every config field is a flag
``--section.field``, the short flags set the same fields, --print-config prints what a run
would record. In-process: nothing here starts a cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tomllib
from typing import Any

import pytest

from pslm.cli import COMMANDS, main
from pslm.flags import FINETUNE_ALIASES, FINETUNE_FIXED, TRAIN_ALIASES, parser
from pslm.settings import field_docs, given, help_text, overrides
from pslm.train.config import TrainConfig, dump_toml
from pslm.train.finetune import DEFAULTS
from pslm.train.run import recorded


def _fields() -> dict[str, tuple[type, dataclasses.Field[Any]]]:
    """Every setting of TrainConfig by path: the class that declares it and the field."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(f.default_factory):
            section = f.default_factory
            assert isinstance(section, type)
            out.update({f"{f.name}.{s.name}": (section, s) for s in dataclasses.fields(section)})
        else:
            out[f.name] = (TrainConfig, f)
    return out


FIELDS = _fields()
FINETUNE_PATHS = [
    p for p in FIELDS if not any(p == x or p.startswith(x + ".") for x in FINETUNE_FIXED)
]
FINETUNE_ARGS = ["--run", "pre", "--data", "labelled.jsonl"]

SAMPLES: dict[str, tuple[str, Any]] = {
    "int": ("7", 7),
    "float": ("0.25", 0.25),
    "str": ("x y", "x y"),
    "tuple[float, float]": ("0.8,0.95", (0.8, 0.95)),
    "list[str]": ("a,b", ["a", "b"]),
}
"""A value as typed and as parsed, for each annotation that takes one."""


def _parse(command: str, *argv: str) -> argparse.Namespace:
    extra = FINETUNE_ARGS if command == "finetune" else []
    return parser(COMMANDS).parse_args([command, *extra, *argv])


def _nested(path: str, value: Any) -> dict[str, Any]:
    section, _, name = path.rpartition(".")
    return {section: {name: value}} if section else {name: value}


def _command(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser(COMMANDS)._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[name]
    command.format_help()  # adds the settings flags
    return command


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_every_field_is_a_flag_that_sets_it(command: str) -> None:
    paths = FINETUNE_PATHS if command == "finetune" else list(FIELDS)
    for path in paths:
        _, f = FIELDS[path]
        if f.type == "bool":
            assert overrides(_parse(command, f"--{path}")) == _nested(path, True)
            assert overrides(_parse(command, f"--no-{path}")) == _nested(path, False)
        else:
            typed, value = SAMPLES[str(f.type)]
            assert overrides(_parse(command, f"--{path}", typed)) == _nested(path, value), path


def test_finetune_takes_no_flag_for_what_the_pretrained_run_decides(capsys) -> None:
    assert "finetune.task" in FIELDS and "model.n_layer" in FIELDS
    for flag in ("--finetune.task", "--model.n_layer", "--data.tokenizer"):
        with pytest.raises(SystemExit) as exc:
            _parse("finetune", flag, "1")
        assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, aliases", [("train", TRAIN_ALIASES), ("finetune", FINETUNE_ALIASES)]
)
def test_each_short_flag_sets_the_same_field_as_the_long_form(command, aliases) -> None:
    for alias, target in aliases.items():
        path = target.removeprefix("not ")
        _, f = FIELDS[path]
        if f.type == "bool":
            args = _parse(command, alias)
            assert overrides(args) == _nested(path, path == target), alias
        else:
            typed, _ = SAMPLES[str(f.type)]
            args = _parse(command, alias, typed)
            assert overrides(args) == overrides(_parse(command, f"--{path}", typed)), alias
        assert given(args)[path].flag == alias  # messages name what was typed


def test_the_short_flags_are_todays() -> None:
    old = "data model tokenizer steps batch-size block-size workers servers consistency " + (
        "replicas push-codec pull-codec launcher address overlap no-shm secure "
        "untie-embeddings slow-worker straggle seed device run-dir"
    )
    assert sorted(TRAIN_ALIASES) == sorted(f"--{name}" for name in old.split())
    assert _parse("train", "--address", "auto").settings["cluster.ray_address"].value == "auto"
    assert overrides(_parse("train", "--untie-embeddings", "--no-shm", "--overlap")) == {
        "model": {"tie_embeddings": False},
        "cluster": {"shm": False, "overlap": True},
    }


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_help_is_the_fields_docstring_and_default(command: str) -> None:
    actions = {a.dest: a for a in _command(command)._actions}
    paths = FINETUNE_PATHS if command == "finetune" else list(FIELDS)
    for path in paths:
        cls, f = FIELDS[path]
        doc = field_docs(cls).get(f.name, "")
        assert doc, f"{cls.__name__}.{f.name} has no docstring"
        text = str(actions[path].help).replace("%%", "%")
        assert text.startswith(help_text(doc) + " (default: "), path
    finetune = command == "finetune"  # fine-tuning has defaults of its own
    lr, steps = (DEFAULTS["optim"]["lr"], 600) if finetune else (0.002, 1200)
    assert actions["optim.lr"].help == f"Peak learning rate. (default: {lr})"
    assert str(actions["train.steps"].help).endswith(f"(default: {steps})")


def test_help_text_is_the_docstring_on_one_line() -> None:
    doc = field_docs(TrainConfig)["run_dir"]
    assert doc.startswith("Where the run goes")
    assert help_text("``bpe`` or\n    ``char``.") == "bpe or char."


def test_print_config_is_what_the_run_would_record(tmp_path, capsys) -> None:
    corpus, run = tmp_path / "story.txt", tmp_path / "run"
    (tmp_path / "base.toml").write_text("[train]\nsteps = 50\n\n[cluster]\nworkers = 3\n")
    code = main(
        ["train", "--config", str(tmp_path / "base.toml"), "--data", str(corpus)]
        + ["--optim.betas", "0.8,0.9", "--workers", "1", "--no-shm", "--model.n_layer", "6"]
        + ["--run-dir", str(run), "--print-config"]
    )
    assert code == 0
    printed = tomllib.loads(capsys.readouterr().out)
    cfg = TrainConfig().override(
        train={"steps": 50},
        cluster={"workers": 1, "shm": False},
        optim={"betas": (0.8, 0.9)},
        model={"n_layer": 6},
        data={"name": str(corpus)},
    )
    expected = recorded(dataclasses.replace(cfg, run_dir=str(run)))
    assert printed == expected.to_dict()
    assert TrainConfig.from_dict(printed) == expected
    assert printed["optim"]["warmup_steps"] == 5 and printed["model"]["n_head"] == 4  # resolved
    assert not run.exists()


def test_print_config_of_the_defaults() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pslm", "train", "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout == dump_toml(recorded(TrainConfig()).to_dict())


def test_finetune_prints_its_config_from_the_pretrained_run(tmp_path, capsys) -> None:
    pre = tmp_path / "pre"
    (pre / "checkpoints" / "step_0000010").mkdir(parents=True)
    (pre / "config.toml").write_text(
        dump_toml(TrainConfig().override(model={"preset": "tiny"}).to_dict())
    )
    labelled = tmp_path / "labelled.jsonl"
    rows = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(40)]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["finetune", "--run", str(pre), "--data", str(labelled), "--lr", "1e-3"]
    argv += ["--finetune.folds", "4", "--fold", "1", "--run-dir", str(tmp_path / "ft")]
    code = main([*argv, "--print-config"])
    assert code == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["model"]["preset"] == "tiny" and printed["data"]["name"] == str(labelled)
    assert printed["optim"]["lr"] == 1e-3 and printed["train"]["steps"] == 600
    ft = printed["finetune"]
    assert ft["task"] == "classify" and ft["labels"] == ["a", "b"] and ft["folds"] == 4
    assert ft["fold"] == 1 and ft["pretrained"] == str(
        (pre / "checkpoints" / "step_0000010").resolve()
    )
    assert printed["run_dir"] == str(tmp_path / "ft") and not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim.lr", "fast"], "--optim.lr takes a number, got 'fast'"),
        (["--steps", "many"], "--steps takes an integer, got 'many'"),
        (["--optim.betas", "0.9"], "--optim.betas takes two numbers"),
        (["--cluster.workers", "0"], "need at least one worker"),
        (["--replicas", "2"], "cluster.replicas must be 0 or 1"),
        (["--block-size", "0"], "--block-size must be >= 1, got 0"),
        (
            ["--resume", "r", "--optim.lr", "1", "--workers", "2"],
            "drop --optim.lr, --run-dir, --workers",
        ),
    ],
)
def test_a_bad_setting_is_one_line_and_starts_nothing(argv, message, tmp_path, capsys) -> None:
    assert main(["train", *argv, "--run-dir", str(tmp_path / "run")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pslm: error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_unknown_setting_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--optim.speed", "1"])
    assert (
        exc.value.code == 2 and "unrecognized arguments: --optim.speed" in capsys.readouterr().err
    )


def test_a_zero_context_length_is_the_presets_in_the_long_form() -> None:
    assert overrides(_parse("train", "--model.block_size", "0")) == {"model": {"block_size": 0}}


def test_role_commands_parse_without_the_configs() -> None:
    code = (
        "import sys; from pslm.cli import COMMANDS, parser; "
        "parser(COMMANDS).parse_args(['scheduler', '--num-workers', '1']); "
        "sys.exit(' '.join(m for m in ('torch', 'pslm.train.config') if m in sys.modules) or 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
