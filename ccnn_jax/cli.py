"""What the scripts in ``experiments/`` share: errors a user can fix print one line, no traceback.

:func:`run` is ``absl.app.run`` with two changes:

- Flag and config parse errors (an unknown ``--config.xyz`` field, a value of the wrong type, a
  bad config string after ``:``, a missing required flag) print ``error: ...`` on one line and
  exit with status 2.
- The errors :func:`user_errors` lists, raised by ``main`` (an invalid config field, a workdir
  in use or made with another config, a run stopped by a non-finite step or a signal, a missing
  or malformed dataset file), print ``error: <message>`` and exit with status 2 for a config
  error, the exception's ``exit_code`` when it has one (128 + signal number for a signal),
  else 1.

Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

#: Exit status of a flag or config error (as for other command-line usage errors).
USAGE_EXIT_CODE = 2


def run(main: Callable[[list[str]], int | None]) -> None:
    """``app.run(main)`` with one-line errors for flags, configs and the :func:`user_errors`."""
    app.run(_with_one_line_errors(main), flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """``flags.FLAGS(argv)``; a parse error prints one ``error:`` line and exits with status 2."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        _exit(_last_line(str(e)), USAGE_EXIT_CODE)
    except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown field>
        _exit(_unknown_field_message(argv, e), USAGE_EXIT_CODE)
    except (TypeError, ValueError) as e:  # ml_collections: a value it cannot take
        _exit(_last_line(str(e)), USAGE_EXIT_CODE)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "fix the config, the workdir or the data", not a bug."""
    from ccnn_jax import checkpoint, configs, stops
    from ccnn_jax.data import checks

    return (
        configs.ConfigError,
        checkpoint.WorkdirError,
        stops.TrainingStopped,
        checks.BadInputError,
        checks.MissingDownloadError,
    )


def _with_one_line_errors(main):
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:
            if not isinstance(e, user_errors()):
                raise
            from ccnn_jax import configs

            default = USAGE_EXIT_CODE if isinstance(e, configs.ConfigError) else 1
            _exit(str(e), getattr(e, "exit_code", default))

    return wrapped


def _exit(message: str, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def _last_line(message: str) -> str:
    """``--flag: <reason>`` from a (possibly multi-line, traceback-carrying) parse message."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return message
    flag = re.match(r"flag (--[\w.]+)", lines[0])
    reason = lines[0] if len(lines) == 1 else re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
    if flag and len(lines) > 1:
        return f"{flag.group(1)}: {reason}"
    return reason


def _unknown_field_message(argv: Sequence[str], error: Exception) -> str:
    """``--config.xyz: no such config field`` for ml_collections' error about an unknown field:
    the override whose field names the error mentions, and the suggestion it makes."""
    text = str(error)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--") and "." in a.split("=")[0]]
    named = [a for a in overrides if any(part in text for part in a[2:].split(".")[1:])]
    suggestion = re.search(r"Did you mean \W*([\w.]+)", text)
    hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
    where = named[0] if named else "a --config override"
    return f"{where}: no such config field{hint}"
