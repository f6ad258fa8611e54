"""User errors: a mistake in the user's input (config, data, checkpoint, paths) is shown as its message alone and
exits 1; anything else is a bug and keeps its traceback."""
import os
import sys


class UserError(ValueError):
    """A message for the user that names the file or key and what is wrong with it."""


def refuse(problems, what):
    """Every problem with what the user gave at once, one line each, before any work."""
    if problems:
        raise UserError(f"{len(problems)} problem(s) with the {what}:\n  " + "\n  ".join(problems))


def run_cli(main, argv=None):
    """main(argv), with a user error printed as its one message (by rank 0 alone under torchrun) and exit status 1."""
    try:
        return main(argv)
    except UserError as e:
        message = str(e)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except KeyboardInterrupt:  # Ctrl-C where no step of a run knows better what to say
        message = "interrupted"
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    return 1
