"""Every command-line flag also from an environment variable and an optional TOML file.

One generic layer over argparse, shared by `moe-peer` and `moe-swarm`:

    parser = build_parser(); install(parser, "MOE_PEER")

Precedence: command line > environment > config file > built-in default. `--max-rows` of
any subcommand reads MOE_PEER_MAX_ROWS; the file (`--config FILE` or MOE_PEER_CONFIG) holds
top-level `max-rows = 4096` keys for every subcommand that has the flag, and tables such as
`[serve]` or `[bench.layer]` for one subcommand (a swarm's list: `initial-peers = [...]`), and
an argument `@FILE` stands for the lines of FILE (`--initial-peers @swarm.txt`). Unknown keys, unparsable values and
unreadable files are usage errors (`prog: error: ...`, exit 2), never tracebacks.

How: before parsing, each flag's default is replaced by a `_Layered` wrapper holding the
environment/file/default value; argparse leaves non-string defaults alone, so after parsing
every wrapper still in the namespace marks a value that did not come from the command line.
That is how mutually exclusive flags resolve across sources (`--checkpoint` on the command
line beats MOE_PEER_MODEL) without re-implementing argparse.
"""

from __future__ import annotations

import argparse
import os
import shlex
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FLAG = "--config"
SOURCES = ("cli", "env", "file", "default")  # highest precedence first
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# actions whose default argparse never mutates: safe to wrap (append/count start from their default)
_PLAIN = (
    argparse._StoreAction,
    argparse._StoreConstAction,  # includes store_true / store_false
    argparse.BooleanOptionalAction,
)


@dataclass(frozen=True)
class _Layered:
    """A default that did not come from the command line (argparse never converts non-str defaults)."""

    value: Any
    source: str  # env | file | default
    origin: str  # what to name in an error: the variable or the file key

    def __repr__(self) -> str:  # `%(default)s` in help texts shows the plain value
        return repr(self.value)

    __str__ = __repr__


def env_name(prefix: str, action: argparse.Action) -> str:
    return f"{prefix}_{flag_name(action).replace('-', '_').upper()}"


def flag_name(action: argparse.Action) -> str:
    """The flag's long name without dashes (`max-rows`), which is also its config-file key."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0].lstrip("-")


def _flags(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and isinstance(action, _PLAIN):
            yield action


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases map to the same parser
                    seen.add(id(sub))
                    yield name, sub


def _tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(subcommand path, parser) for the parser and every nested subparser."""
    yield path, parser
    for name, sub in _subparsers(parser):
        yield from _tree(sub, (*path, name))


def env_vars(parser: argparse.ArgumentParser, env_prefix: str) -> dict[str, str]:
    """Every environment variable the parser reads -> its flag (for checking deploy files)."""
    out = {f"{env_prefix}_CONFIG": CONFIG_FLAG}
    for _, p in _tree(parser):
        out.update({env_name(env_prefix, a): f"--{flag_name(a)}" for a in _flags(p)})
    return out


def install(parser: argparse.ArgumentParser, env_prefix: str) -> argparse.ArgumentParser:
    """Add --config to every (sub)parser, env var names to every help text, and layered parsing."""
    for _, p in _tree(parser):
        if not any(CONFIG_FLAG in a.option_strings for a in p._actions):
            p.add_argument(
                CONFIG_FLAG,
                type=Path,
                default=None,
                metavar="FILE",
                help=f"TOML file of option values (keys are option names, e.g. max-rows = 4096; [subcommand] "
                f"tables apply to one subcommand) [env: {env_prefix}_CONFIG]",
            )
        for action in _flags(p):
            if action.help is not argparse.SUPPRESS and CONFIG_FLAG not in action.option_strings:
                tag = f"[env: {env_name(env_prefix, action)}]"
                if tag not in (action.help or ""):
                    action.help = f"{action.help} {tag}" if action.help else tag
        note = (
            f"Every option can also be set with its {env_prefix}_* environment variable or in a TOML file given "
            f"with {CONFIG_FLAG}; precedence: command line > environment > config file > default."
        )
        p.epilog = f"{p.epilog}\n\n{note}" if p.epilog else note
    original = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        return _parse_layered(parser, original, env_prefix, args, namespace, os.environ)

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]  # parse_args calls it
    # `--initial-peers @swarm.txt`: an argument @FILE stands for the file's lines (a swarm is named
    # by its bootstrap list, one multiaddr per line; blank lines and # comments are skipped)
    parser.fromfile_prefix_chars = "@"
    parser.convert_arg_line_to_args = _file_arg_lines  # type: ignore[method-assign]
    return parser


def _file_arg_lines(line: str) -> list[str]:
    line = line.strip()
    return [] if not line or line.startswith("#") else [line]


def _config_path(argv: Sequence[str], env: Mapping[str, str], prefix: str) -> Path | None:
    # needed before parsing: its values become the defaults argparse parses against
    path = env.get(f"{prefix}_CONFIG") or None
    it = iter(argv)
    for tok in it:
        if tok == "--":
            break
        if tok == CONFIG_FLAG:
            path = next(it, path)
        elif tok.startswith(CONFIG_FLAG + "="):
            path = tok.split("=", 1)[1]
    return Path(path) if path else None


def load_config(path: Path) -> dict[str, Any]:
    """The TOML document; ValueError with a message fit for a usage error."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror or e}") from None


def _file_values(
    doc: Mapping[str, Any], path: Path, tree: list[tuple[tuple[str, ...], argparse.ArgumentParser]]
) -> dict[tuple[str, ...], dict[str, tuple[Any, str]]]:
    """Per subcommand path: flag name -> (value, 'file:key'); top-level keys apply wherever the flag exists,
    a [sub] table's keys override them for that subcommand. Unknown keys are errors (typos never pass silently)."""
    flags_at = {p: {flag_name(a) for a in _flags(parser)} for p, parser in tree}
    out: dict[tuple[str, ...], dict[str, tuple[Any, str]]] = {p: {} for p in flags_at}

    def walk(table: Mapping[str, Any], path: tuple[str, ...], where: str) -> None:
        for raw_key, value in table.items():
            key = raw_key.replace("_", "-")
            sub = (*path, raw_key)
            if isinstance(value, dict) and sub in flags_at:
                walk(value, sub, f"[{'.'.join(sub)}] ")
                continue
            # a [bench] key may be meant for every subcommand below bench
            known = set().union(*(f for p, f in flags_at.items() if p[: len(path)] == path))
            if key not in known:
                scope = f"'{' '.join(path)}'" if path else "any command"
                raise ValueError(f"config file {path_str}: {where}unknown option {raw_key!r} for {scope}")
            for p in flags_at:
                # a key applies to its own subcommand and the ones nested below it
                if p[: len(path)] == path and key in flags_at[p]:
                    out[p][key] = (value, f"{where}{raw_key} in {path_str}")

    path_str = str(path)
    walk(doc, (), "")
    return out


def _convert(action: argparse.Action, value: Any, origin: str, from_env: bool) -> Any:
    """A value from the environment (a string) or TOML, converted like argparse would; ValueError otherwise."""
    if isinstance(action, argparse._StoreConstAction | argparse.BooleanOptionalAction) and action.nargs == 0:
        if isinstance(value, str):
            v = value.strip().lower()
            if v not in _TRUE | _FALSE:
                raise ValueError(f"{origin}: expected true or false, got {value!r}")
            flag = v in _TRUE
        elif isinstance(value, bool):
            flag = value
        else:
            raise ValueError(f"{origin}: expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return flag
        # store_true/store_false/store_const: "true" means the flag is given
        return action.const if flag else action.default
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    if many:
        if isinstance(value, str):
            items = shlex.split(value) if from_env else [value]
        elif isinstance(value, list):
            items = value
        else:
            raise ValueError(f"{origin}: expected a list, got {value!r}")
        converted = [_convert_one(action, item, origin) for item in items]
        if action.nargs == "+" and not converted:
            raise ValueError(f"{origin}: expected at least one value")
        return converted
    return _convert_one(action, value, origin)


def _convert_one(action: argparse.Action, value: Any, origin: str) -> Any:
    if isinstance(value, dict | list):
        raise ValueError(f"{origin}: expected a single value, got {value!r}")
    if isinstance(value, bool) and action.type not in (None, str, bool):
        raise ValueError(f"{origin}: expected a value for {action.metavar or action.dest}, got {value!r}")
    text = value if isinstance(value, str) else str(value)
    convert = action.type or str
    try:
        out = value if convert in (int, float) and type(value) is convert else convert(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        name = getattr(convert, "__name__", repr(convert))
        raise ValueError(f"{origin}: invalid {name} value: {value!r}") from e
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ValueError(f"{origin}: invalid choice {out!r} (choose from {choices})")
    return out


def _parse_layered(
    root: argparse.ArgumentParser,
    original: Any,
    prefix: str,
    args: Sequence[str] | None,
    namespace: argparse.Namespace | None,
    env: Mapping[str, str],
) -> tuple[argparse.Namespace, list[str]]:
    import sys

    argv = list(sys.argv[1:] if args is None else args)
    tree = list(_tree(root))
    file_values: dict[tuple[str, ...], dict[str, tuple[Any, str]]] = {p: {} for p, _ in tree}
    config = _config_path(argv, env, prefix)
    if config is not None:
        try:
            file_values = _file_values(load_config(config), config, tree)
        except ValueError as e:
            _fail(root, str(e))

    saved: list[tuple[Any, str, Any]] = []  # (object, attribute, value) to restore after parsing

    def swap(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    actions: dict[int, argparse.Action] = {}
    try:
        for path, p in tree:
            for action in _flags(p):
                if action.dest == "config":
                    continue
                name, var = flag_name(action), env_name(prefix, action)
                if var in env:
                    layered = _Layered(env[var], "env", var)
                elif name in file_values[path]:
                    value, origin = file_values[path][name]
                    layered = _Layered(value, "file", origin)
                else:
                    layered = _Layered(action.default, "default", name)
                if action.default is argparse.SUPPRESS and layered.source == "default":
                    continue
                actions[id(layered)] = action
                swap(action, "default", layered)
                if layered.source != "default":
                    swap(action, "required", False)
            for group in p._mutually_exclusive_groups:
                if group.required and any(
                    isinstance(a.default, _Layered) and a.default.source != "default" for a in group._group_actions
                ):
                    swap(group, "required", False)
        ns, rest = original(argv, namespace)
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
    _resolve(root, ns, actions)
    return ns, rest


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    """A value from the environment or a config file is wrong: one line naming it, exit 2. The
    usage block argparse prints for command-line mistakes would only bury it."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _invoked(root: argparse.ArgumentParser, ns: argparse.Namespace) -> list[argparse.ArgumentParser]:
    """The chain of parsers the command line went through (root, subcommand, sub-subcommand...)."""
    chain, p = [root], root
    while True:
        sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(ns, sub.dest, None) if sub is not None and sub.dest is not argparse.SUPPRESS else None
        if name is None or name not in sub.choices:
            return chain
        p = sub.choices[name]
        chain.append(p)


def _resolve(root: argparse.ArgumentParser, ns: argparse.Namespace, actions: dict[int, argparse.Action]) -> None:
    """Unwrap layered values (converting env/file ones) and settle mutually exclusive flags by precedence."""
    chain = _invoked(root, ns)
    leaf = chain[-1]
    sources: dict[str, str] = {}
    origins: dict[str, str] = {}
    for dest, value in vars(ns).items():
        if not isinstance(value, _Layered):
            sources[dest] = "cli"
            continue
        origins[dest] = value.origin
        action = actions[id(value)]
        if value.source == "default":
            setattr(ns, dest, value.value)
        else:
            try:
                setattr(ns, dest, _convert(action, value.value, value.origin, from_env=value.source == "env"))
            except ValueError as e:
                _fail(leaf, str(e))
        sources[dest] = value.source
    for p in chain:
        for group in p._mutually_exclusive_groups:
            given = [(SOURCES.index(sources.get(a.dest, "default")), a) for a in group._group_actions]
            given = [(rank, a) for rank, a in given if SOURCES[rank] != "default"]
            if not given:
                continue
            best = min(rank for rank, _ in given)
            winners = [a for rank, a in given if rank == best]
            if len(winners) > 1:  # argparse already rejects two on the command line
                names = " and ".join(origins.get(a.dest, f"--{flag_name(a)}") for a in winners)
                _fail(p, f"{names} are mutually exclusive")
            for rank, a in given:
                if rank != best:
                    setattr(ns, a.dest, a.default)  # a lower-precedence source loses to the winner
