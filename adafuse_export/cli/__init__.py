"""The `adafuse-export` command line: one group, one module per command group.

Commands are plain click commands in their own modules (checkpoints, run, export, validate,
convert, example) and are added to the group here, so no module imports this one back. Options
that several commands share are defined once in `options.py`. Heavy packages (torch, onnx,
tensorrt) are imported inside the commands that need them, so `--help` works everywhere. A user
mistake raises AdafuseError: we print its one line and exit 2; bugs keep their traceback.
"""
from __future__ import annotations

import errno
import signal
import sys

import click

from .. import __version__
from ..errors import AdafuseError, shown
from .options import emit
from . import checkpoints, convert, doctor, example, export, run, validate

EXIT_USAGE = 2
# errors of a path itself (too long, a loop, not a directory, no permission, full or read-only disk): the user's input,
# wherever in the code the path was first touched
PATH_ERRORS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EACCES, errno.EPERM,
               errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENXIO, errno.EXDEV}


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, prog_name="adafuse-export")
@click.pass_context
def cli(ctx):
    """Export mixture-of-LoRA-experts LLMs (AdaFuse pre-gating + fused adapter kernels).

    \b
    Typical session (CKPT: a trained adapter directory, or try the built-in example):
      adafuse-export make-example ex/            # a tiny pre-gated checkpoint
      adafuse-export inspect ex/                 # what is in it
      adafuse-export run ex/ --prompt-ids 1,2,3  # greedy decoding with the PyTorch reference
      adafuse-export convert ex/ ex.engine       # ONNX, checked against the reference, then the engine
      adafuse-export validate ex/ ex.onnx        # compare the export with the reference again

    `adafuse-export COMMAND --help` explains each command and its defaults.
    """
    if ctx.invoked_subcommand is None:  # bare `adafuse-export`: the help, not a usage error
        click.echo(ctx.get_help())


for command in (checkpoints.formats, checkpoints.inspect, run.run, export.export_routes, example.make_example,
                convert.convert, export.export_onnx, validate.validate, doctor.doctor):
    cli.add_command(command)


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="adafuse-export", standalone_mode=False)
    except AdafuseError as e:
        emit(f"error: {e}", err=True)
        return EXIT_USAGE
    except click.exceptions.Abort:
        emit("error: interrupted", err=True)
        return 130
    except click.ClickException as e:
        # click quotes the bad value as given: escaped like every printed input (message is Final in its stubs)
        setattr(e, "message", shown(e.message))
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except OSError as e:  # a path the user gave (or a file named) that the system refuses: one line, no traceback
        if e.filename is None or e.errno not in PATH_ERRORS:
            raise
        emit(f"error: {e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else ""), err=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        emit("error: interrupted", err=True)
        return 130
    return 0


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a closed terminal, a lost ssh session) raised where the process is, so that atomic writes
    and staging directories remove their temporaries (Python's default action for both ends the process with no
    cleanup at all)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


ENDING_SIGNALS = {signal.SIGTERM: "terminated", signal.SIGHUP: "hangup"}


def entry_point() -> None:
    for signum in ENDING_SIGNALS:
        signal.signal(signum, _terminate)
    try:
        code = main()
    except Terminated as e:
        try:
            emit(f"error: {ENDING_SIGNALS[signal.Signals(e.signum)]}", err=True)
        except OSError:
            pass  # the terminal that hung up may be gone
        code = 128 + e.signum
    sys.exit(code)
