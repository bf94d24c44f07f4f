"""`make-example`: the built-in tiny random checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from ..examples import KINDS
from ..outputs import claim
from .options import family_choices, force_option, import_torch, emit


@click.command("make-example")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(list(KINDS)), default="pregate", show_default=True, help="Adapter kind of the example.")
@click.option("--family", type=click.Choice(family_choices()), default="llama", show_default=True)
@force_option("Overwrite a non-empty OUT_DIR.")
def make_example(out_dir, kind, family, force):
    """Write a tiny random canonical checkpoint (the built-in example) to OUT_DIR."""
    import_torch()
    from ..examples import make_example as write_example
    from ..outputs import EXAMPLE_MARKER, atomic_directory, example_files

    claim(out_dir, option="OUT_DIR", inputs=(), force=force, ours=example_files, directory=True)
    with atomic_directory(out_dir, force) as tmp:
        write_example(tmp, kind, family)
        (tmp / EXAMPLE_MARKER).write_text(f"written by adafuse-export make-example --kind {kind} --family {family}\n")
    emit(f"wrote {kind} example ({family}) to {out_dir}")
