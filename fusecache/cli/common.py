"""What every command shares: the usage error, the parser, the help layout, value checks.

Bad input is one line on stderr and exit code 2, with nothing mounted, created
or deleted: a value is checked where it is parsed (so a flag and an environment
variable get the same check), and a command checks the rest before it acts.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from fusecache.config import format_size, parse_size

EXIT_USAGE = 2
ENV_PREFIX = "FUSECACHE_"


class UsageError(Exception):
    """Bad input: one line for the user, exit code 2, nothing mounted, created or deleted."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, unless its help says it in words or it is an off switch."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if action.default is True:  # an on switch
            return f"{text} (default: on)"
        return super()._get_help_string(action)


class EnvHelpFormatter(HelpFormatter):
    """HelpFormatter that also names each option's environment variable."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action) or ""
        name = env_name(action)
        return f"{text} [env {name}]" if name else text


def env_name(action: argparse.Action) -> str | None:
    """FUSECACHE_MEM_CACHE for --mem-cache: every long option of an env command has one."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    if not longs or isinstance(action, argparse._HelpAction):
        return None
    return ENV_PREFIX + longs[0][2:].upper().replace("-", "_")


class _Unset:
    """An option not given on the command line (its environment variable or default applies)."""


_UNSET = _Unset()


class CommandParser(argparse.ArgumentParser):
    """A parser whose errors are one line and exit code 2.

    env=True: every long option may also come from FUSECACHE_<OPTION>; a flag wins.
    takes_command=True: what follows the first `--` is a command line, in args.command_argv.
    """

    def __init__(self, *args: Any, env: bool = False, takes_command: bool = False,
                 **kwargs: Any) -> None:
        if env:
            kwargs["formatter_class"] = EnvHelpFormatter
        super().__init__(*args, **kwargs)
        self.env = env
        self.takes_command = takes_command

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        command: list[str] = []
        if self.takes_command and "--" in args:
            split = args.index("--")
            args, command = args[:split], args[split + 1:]
        if self.env and namespace is None:
            # Preset, so that what the command line leaves alone can be told apart.
            namespace = argparse.Namespace(**{a.dest: None if _is_list(a) else _UNSET
                                              for a in self._env_actions()})
        parsed, rest = super().parse_known_args(args, namespace)
        if self.env:
            self._fill_from_environment(parsed)
        if self.takes_command:
            if not command:
                self.error("COMMAND is missing: give it after --, e.g. -- python server.py")
            parsed.command_argv = command
        return parsed, rest

    def _env_actions(self) -> list[argparse.Action]:
        return [a for a in self._actions if env_name(a)]

    def _fill_from_environment(self, parsed: argparse.Namespace) -> None:
        for action in self._env_actions():
            value = getattr(parsed, action.dest)
            if value is not _UNSET and value is not None:
                continue  # given on the command line
            name = env_name(action)
            assert name is not None
            text = os.environ.get(name, "")
            if text.strip():
                try:
                    value = _from_text(action, text)
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    self.error(f"{name}={text!r}: {exc}")
            elif isinstance(action.default, str) and callable(action.type):
                value = action.type(action.default)  # as argparse does with a str default
            else:
                value = action.default
            setattr(parsed, action.dest, value)


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")


def _from_text(action: argparse.Action, text: str) -> object:
    """The value an environment variable's *text* gives *action*, checked as a flag's would be."""
    if action.nargs == 0:  # a switch: --sha256, --no-sha256, --force
        flag = parse_bool(text)
        if isinstance(action, argparse.BooleanOptionalAction):
            return flag
        return action.const if flag else action.default
    convert: Callable[[str], object] = action.type if callable(action.type) else str
    if _is_list(action):
        items = [convert(item) for item in shlex.split(text)]
        if not items:
            raise ValueError("expected at least one value")
        return items
    value = convert(text.strip())
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
    return value


def parse_bool(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off, any case."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1, true, yes, on or 0, false, no, off")


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argument type: a whole number in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {value}")
        return value
    return parse


def seconds(zero_ok: bool) -> Callable[[str], float]:
    """An argument type: a finite number of seconds, positive (or also 0 if *zero_ok*)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0 <= value < math.inf if zero_ok else 0 < value < math.inf):
            kind = "zero or a positive" if zero_ok else "a positive"
            raise argparse.ArgumentTypeError(f"must be {kind} number of seconds, not {text!r}")
        return value
    return parse


def size(minimum: int = 0, multiple: int = 1, zero_ok: bool = False) -> Callable[[str], int]:
    """An argument type: a size (512M, 4G) of at least *minimum* bytes, a multiple of *multiple*.

    With *zero_ok*, 0 is also accepted (it turns a cache off).
    """
    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value == 0 and zero_ok:
            return 0
        if value < minimum or value == 0:
            least = f"at least {format_size(minimum)}" if minimum else "positive"
            raise argparse.ArgumentTypeError(
                f"must be {least}{' (or 0 to turn it off)' if zero_ok else ''}, not {text!r}")
        if value % multiple:
            raise argparse.ArgumentTypeError(
                f"must be a multiple of {format_size(multiple)}, not {text!r}")
        return value
    return parse
