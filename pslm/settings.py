"""Command-line flags made from typed config dataclasses: each field once, as ``--section.field``.

    add_settings(p, TrainConfig, aliases={"--workers": "cluster.workers"})
    args = p.parse_args(["--optim.lr", "3e-4", "--workers", "4", "--no-cluster.shm"])
    overrides(args)     # {"optim": {"lr": 0.0003}, "cluster": {"workers": 4, "shm": False}}
    given(args)["cluster.workers"].flag     # "--workers": what was typed, for messages

A field of a nested dataclass (a section) is ``--section.field VALUE``, a field of the root
itself ``--field VALUE``. The flag's help is the field's docstring (the string literal under
it, read from the source), its value's form follows the annotation, and the help shows the
default. ``bool`` fields are switches: ``--cluster.overlap`` / ``--no-cluster.overlap``. A
pair of floats is written ``0.9,0.95``, a list of strings ``a,b,c``. An alias is another
spelling of a field's flag (``--workers``); ``"not cluster.shm"`` makes it a switch that turns
a bool field off (``--no-shm``).

A value of the wrong form raises ConfigError naming the flag (one line, like every bad
setting); whether the value makes sense is the dataclass's own check (``__post_init__``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pslm.errors import ConfigError

SETTINGS = "settings"
"""The namespace attribute that holds the settings given: ``{path: Given}``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Given:
    """A setting given on the command line: its value and the flag it was given as."""

    value: Any
    flag: str


@dataclasses.dataclass(frozen=True, slots=True)
class Form:
    """How a value of one annotation is written on the command line."""

    metavar: str
    what: str
    """What the flag takes, for the error message: ``--x takes an integer, got 'a'``."""
    parse: Callable[[str], Any]
    show: Callable[[Any], str]


def _floats(raw: str) -> tuple[float, float]:
    a, b = raw.split(",")  # ValueError unless exactly two
    return float(a), float(b)


def _strings(raw: str) -> list[str]:
    return [s.strip() for s in raw.split(",") if s.strip()]


def _joined(values: Iterable[Any]) -> str:
    return ",".join(str(v) for v in values)


FORMS: dict[str, Form] = {
    "int": Form("INT", "an integer", int, str),
    "float": Form("FLOAT", "a number", float, str),
    "str": Form("STR", "a string", str, str),
    "tuple[float, float]": Form("FLOAT,FLOAT", "two numbers, e.g. 0.9,0.95", _floats, _joined),
    "list[str]": Form("A,B,...", "names separated by commas", _strings, _joined),
}
"""Value forms by annotation (as written: the configs use ``from __future__ import
annotations``); ``bool`` fields are switches instead."""


@functools.cache
def field_docs(cls: type) -> Mapping[str, str]:
    """``{field: docstring}`` of a dataclass: the string literal right under each field."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(node, ast.ClassDef), cls
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            if isinstance(after.value.value, str):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def help_text(doc: str) -> str:
    """A docstring as one line of terminal text (argparse wraps it): no ``markup``."""
    return " ".join(doc.replace("``", "").split())


class _Setting(argparse.Action):
    """Parses one field's value and keeps it, with the flag it came as, in ``SETTINGS``."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        form: Form | None,
        switches: Mapping[str, bool],
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, nargs=0 if form is None else None, **kwargs)
        self.form, self.switches = form, switches

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        flag = option_string or self.dest
        if self.form is None:
            value = self.switches[flag]
        else:
            try:
                value = self.form.parse(str(values))
            except ValueError:
                raise ConfigError(f"{flag} takes {self.form.what}, got {values!r}") from None
        setattr(namespace, SETTINGS, {**given(namespace), self.dest: Given(value, flag)})


def add_settings(
    p: argparse.ArgumentParser,
    root: type,
    *,
    aliases: Mapping[str, str] | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """Add a flag for every field of dataclass ``root`` and of its sections (fields that are
    dataclasses), one argument group per section. ``aliases``: flag -> ``"section.field"`` or
    ``"not section.field"`` (a switch that sets a bool field false); ``defaults``: defaults
    shown instead of the dataclass's, by section; ``skip``: sections or ``section.field``
    paths that get no flag (the command sets them itself)."""
    by_path: dict[str, list[tuple[str, bool]]] = {}
    for flag, target in (aliases or {}).items():
        path = target.removeprefix("not ")
        by_path.setdefault(path, []).append((flag, path == target))
    shown = defaults or {}
    paths = set()
    for f in dataclasses.fields(root):
        section = f.default_factory
        if f.name in skip or not (dataclasses.is_dataclass(section) and isinstance(section, type)):
            continue
        group = p.add_argument_group(f"[{f.name}]")
        for sub in dataclasses.fields(section):
            path = f"{f.name}.{sub.name}"
            if path not in skip:
                default = shown.get(f.name, {}).get(sub.name, _default(sub))
                _add(group, path, sub, field_docs(section), default, by_path.get(path, []))
                paths.add(path)
    for f in dataclasses.fields(root):
        if f.name not in skip and not dataclasses.is_dataclass(f.default_factory):
            _add(p, f.name, f, field_docs(root), _default(f), by_path.get(f.name, []))
            paths.add(f.name)
    if stray := set(by_path) - paths:
        raise ValueError(f"aliases of fields that have no flag: {sorted(stray)}")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _add(
    p: argparse._ActionsContainer,
    path: str,
    f: dataclasses.Field[Any],
    docs: Mapping[str, str],
    default: Any,
    aliases: list[tuple[str, bool]],
) -> None:
    """One field's argument: its own flag(s) and its aliases' (``(flag, sets true)``)."""
    doc = help_text(docs.get(f.name, ""))
    form: Form | None = None
    if str(f.type) == "bool":
        switches = {f"--{path}": True, f"--no-{path}": False, **dict(aliases)}
        flags, shown = list(switches), "true" if default else "false"
    else:
        if not all(on for _, on in aliases):
            raise ValueError(f"only a bool field has a 'not' alias, not {path}")
        switches = {}
        flags = [f"--{path}", *(flag for flag, _ in aliases)]
        form = FORMS[str(f.type)]  # KeyError: a field of a type the command line cannot take
        shown = form.show(default) or '""'
    p.add_argument(
        *flags,
        action=_Setting,
        dest=path,
        default=argparse.SUPPRESS,
        metavar=form.metavar if form else None,
        help=f"{doc} (default: {shown})".lstrip().replace("%", "%%"),  # argparse formats it
        form=form,
        switches=switches,
    )


def given(args: argparse.Namespace) -> dict[str, Given]:
    """The settings given on the command line, by path (``"cluster.workers"``)."""
    return dict(getattr(args, SETTINGS, None) or {})


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given, nested like the config's TOML:
    ``{"cluster": {"workers": 4}, "run_dir": "runs/x"}``."""
    out: dict[str, Any] = {}
    for path, setting in given(args).items():
        section, _, name = path.rpartition(".")
        (out.setdefault(section, {}) if section else out)[name] = setting.value
    return out
