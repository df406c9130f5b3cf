"""One exception type for bad input: the CLIs turn it into a one-line message and exit code 2."""

import functools
import sys


REPORTED = "reported"  # KeyboardInterrupt("reported"): the interrupted command printed its own message


class LadcError(Exception):
    """A user-facing problem: the message names the problem and the fix."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise LadcError(message)


def cli_main(fn):
    """Wrap a CLI entry point: LadcError -> 'error: ...' on stderr and exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LadcError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:
            if not (e.args and e.args[0] == REPORTED):  # stage 1 already said how to continue
                print("interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # `python train.py runs | head`: the reader left, nothing to say
            import os
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)

    return wrapper
