"""The `tlm` command line: fire parses, `tlm.cli.commands` holds one short function per command.

Help is tlm's own (`tlm --help`, `tlm COMMAND --help`: the command's docstring, its flags with defaults; no
pager, no fire type lines). A user error is one `tlm: error:` line and exit status 2 before any work
(TLM_DEBUG=1 adds its traceback); Ctrl-C outside training is `tlm: interrupted` and 130; a bug shows its
traceback. torch is imported only by the commands that need it.
"""

from __future__ import annotations

import errno
import inspect
import logging
import textwrap
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from tlm_base.errors import ConfigError, TLMError
from tlm_base.fileio import disk_full, is_disk_full
from tlm.cli.commands import COMMANDS

log = logging.getLogger("tlm")


# --- help ----------------------------------------------------------------------------------------------------

def _docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """(the description, {flag: its text}) from a Google-style docstring."""
    text = inspect.getdoc(fn) or ""
    head, _, args = text.partition("\nArgs:\n")
    flags: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        stripped = line.strip()
        if line.startswith("    ") and not line.startswith("        ") and ":" in stripped:
            name, _, rest = stripped.partition(":")
            flags[name] = rest.strip()
        elif name and stripped:
            flags[name] += " " + stripped
    return head.strip(), flags


def _flag(param: inspect.Parameter) -> str:
    name = param.name
    if param.default is inspect.Parameter.empty:
        return f"--{name} {name.upper()}"
    if isinstance(param.default, bool):
        return f"--{name}" if not param.default else f"--no{name}"
    return f"--{name} {name.upper()}"


def command_help(name: str) -> str:
    fn = COMMANDS[name]
    description, texts = _docstring(fn)
    params = list(inspect.signature(fn).parameters.values())
    usage = [f"{p.name.rstrip('s').upper()} [{p.name.rstrip('s').upper()} ...]" if p.kind is inspect.Parameter.VAR_POSITIONAL
             else f"--{p.name} {p.name.upper()}" for p in params if p.default is inspect.Parameter.empty
             and p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    wrap = textwrap.TextWrapper(width=100, initial_indent="      ", subsequent_indent="      ")
    lines = [f"usage: tlm {name} {' '.join(usage)} [flags]" + (" [--KEY=VALUE ...]" if extra else ""), ""]
    for paragraph in description.split("\n\n"):
        lines += [textwrap.fill(paragraph, 100), ""]
    lines.append("flags:")
    for p in params:
        text = texts.get(p.name, "")
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            lines += ["  --KEY=VALUE ...", wrap.fill(text)]
            continue
        default = "" if p.default is inspect.Parameter.empty else f" (default: {p.default})"
        if isinstance(p.default, bool):
            default = f" (default: {'on' if p.default else 'off'}; --{p.name} / --no{p.name})"
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            lines += [f"  {p.name.rstrip('s').upper()} ...", wrap.fill(text)]
            continue
        lines.append(f"  {_flag(p) if not isinstance(p.default, bool) else '--' + p.name}")
        lines.append(wrap.fill(f"{text}{default}" if text else default.strip()))
    if name == "train":
        lines += ["", textwrap.fill("config keys and their defaults before a recipe (--SECTION.KEY=VALUE; tlm train "
                                    "--config RECIPE --show_config prints them resolved; docs/training.md says what "
                                    "each does):", 100)]
        lines += [textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="      ") for line in config_keys()]
    return "\n".join(lines) + "\n"


def _shown(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_keys() -> list[str]:
    """One line per config section with its keys and their defaults (the training config's dataclasses)."""
    import dataclasses

    from tlm.training.config import TrainConfig

    lines = ["name", "model.preset and every model field (tlm presets shows them), e.g. model.num_key_value_heads"]
    for field in dataclasses.fields(TrainConfig()):
        value = getattr(TrainConfig(), field.name)
        if dataclasses.is_dataclass(value) and field.name != "model":
            lines.append(f"{field.name}: " + ", ".join(f"{f.name}={_shown(getattr(value, f.name))}"
                                                       for f in dataclasses.fields(value)))
    return lines


def main_help() -> str:
    from tlm import __version__

    width = max(len(n) for n in COMMANDS)
    lines = [f"tlm {__version__}: pretrain and ablate small Llama-style language models", "",
             "usage: tlm COMMAND [flags]     (tlm COMMAND --help for a command's flags; tlm --version)", "",
             "commands:"]
    lines += [f"  {n:{width}s}  {_docstring(fn)[0].splitlines()[0]}" for n, fn in COMMANDS.items()]
    return "\n".join(lines) + "\n"


# --- checks before any work ------------------------------------------------------------------------------------

def check_command_line(args: list[str]) -> None:
    """Refuse, before any work, an unknown command, arguments the command would not consume (fire reports them
    only after the command has run) and values given to switches (`--overwrite extra`)."""
    if not args or args[0].startswith("-"):
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        import difflib

        hint = difflib.get_close_matches(command, list(COMMANDS), n=1)
        raise ConfigError(f"unknown command '{command}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                          + f"; commands: {', '.join(COMMANDS)}")
    if "--" in rest:
        rest = rest[: rest.index("--")]
    try:
        from fire.core import _MakeParseFn

        (positional, _), _, remaining, _ = _MakeParseFn(COMMANDS[command], {})(rest)
    except Exception:  # fire's own error (e.g. a missing value) is clear enough; let it report
        return
    if remaining:
        hint = f"; did you mean --config {remaining[0]}?" if command == "train" and remaining[0].endswith(".yaml") else ""
        raise ConfigError(f"tlm {command}: unexpected argument {remaining[0]!r}{hint} (flags take the form --name=value; "
                          f"see tlm {command} --help)")
    params = [p for p in inspect.signature(COMMANDS[command]).parameters.values()
              if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    for param, value in zip(params, positional):
        if isinstance(param.default, bool) and not isinstance(value, bool):
            raise ConfigError(f"--{param.name} is a switch and takes no value (got {value!r}); write --{param.name} "
                              f"or --no{param.name}")


# --- the entry point ---------------------------------------------------------------------------------------------

def _report(error: BaseException, line: str) -> None:
    if os.environ.get("TLM_DEBUG") == "1":
        import traceback

        traceback.print_exception(error)
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and line.startswith("tlm: "):  # which rank says it, in a job of several
        line = f"tlm: rank {os.environ.get('RANK', '?')} of {world}: {line[len('tlm: '):]}"
    print(line, file=sys.stderr, flush=True)


def _configs(args: list[str]) -> list[str]:
    """Every `--config FILE` of `tlm train` / `tlm plan` as one `--config=[FILE, ...]`, the file names exactly as
    typed: fire would keep only the last one, and would read a name such as 2024 or 1e3 as a number. The files
    compose key by key, a later one overriding an earlier one's keys (tlm.training.config.load_config)."""
    end = args.index("--") if "--" in args else len(args)
    kept, files, at = [], [], None
    i = 0
    while i < end:
        arg = args[i]
        if arg == "--config" and i + 1 < end:
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg[len("--config="):], i + 1
        else:
            kept.append(arg)
            i += 1
            continue
        at = len(kept) if at is None else at
        files.append(value)
    if not files:
        return args
    return [*kept[:at], f"--config={files!r}", *kept[at:], *args[end:]]


def _normalise(args: list[str]) -> list[str]:
    # `tlm tokenizer --from DIR`: "from" cannot name a Python parameter
    if args and args[0] == "tokenizer":
        args = [("--from_dir" + a[len("--from"):]) if a == "--from" or a.startswith("--from=") else a for a in args]
    if args and args[0] in ("train", "plan"):
        args = _configs(args)
    # The deepspeed launcher adds --local_rank=N (before the command when run with --module); the rank is also in
    # the environment, so drop the flag wherever it is.
    for arg in [a for a in args if a.split("=")[0] in ("--local_rank", "--local-rank")]:
        args.remove(arg)
        if "=" in arg:
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
    return args


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `tlm`."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    args = _normalise(list(sys.argv[1:] if argv is None else argv))
    if not args or args[0] in ("-h", "--help", "help"):
        print(main_help(), end="")
        return
    if args[0] in ("--version", "-V"):
        from tlm import __version__

        print(f"tlm {__version__}")
        return
    if ("--help" in args or "-h" in args) and args[0] in COMMANDS:
        print(command_help(args[0]), end="")
        return
    try:
        check_command_line(args)
        import fire

        fire.Fire(COMMANDS, command=args, name="tlm", serialize=lambda result: None)
    except TLMError as e:
        if e.reported_by_rank0 and os.environ.get("RANK", "0") != "0":
            sys.exit(e.exit_status)  # rank 0 says it
        _report(e, f"tlm: error: {e}")
        sys.exit(e.exit_status)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP where a command stops as Ctrl-C does (prepare)
        signum = getattr(e, "signum", signal.SIGINT)
        _report(e, "tlm: interrupted" + (f" by {signal.Signals(signum).name}" if signum != signal.SIGINT else ""))
        sys.exit(128 + signum)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            _report(e, f"tlm: error: {too_many_open_files(e)}")
            sys.exit(2)
        if not is_disk_full(e):
            raise
        _report(e, f"tlm: error: {disk_full(e, e.filename or Path.cwd())}")
        sys.exit(2)


def too_many_open_files(error: OSError) -> str:
    """The line for EMFILE (this process's open-file limit) or ENFILE (the system's table is full)."""
    if error.errno == errno.ENFILE:
        return ("the system's table of open files is full (ENFILE): close other programs, or raise fs.file-max "
                "(sysctl), and rerun")
    from tlm.training.run import open_files_limit

    where = f" (opening {error.filename})" if error.filename else ""
    return f"too many open files{where}: {open_files_limit()}"
