"""`make-example`: the built-in tiny random checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from ..examples import KINDS
from ..outputs import claim
from .options import family_choices, force_option, import_torch, emit


@click.command("make-example", short_help="Write a tiny random checkpoint to try the tool on.")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(list(KINDS)), default="pregate", show_default=True, help="Adapter kind of the example.")
@click.option("--family", type=click.Choice(family_choices()), default="llama", show_default=True)
@click.option("--tied", is_flag=True, help="Tie the head to the embeddings (tie_word_embeddings), as Gemma, small "
              "Qwen and Llama 3.2 checkpoints do.")
@force_option("Overwrite a non-empty OUT_DIR.")
def make_example(out_dir, kind, family, tied, force):
    """Write a tiny random canonical checkpoint (the built-in example) to OUT_DIR."""
    import_torch()
    from ..examples import make_example as write_example
    from ..outputs import EXAMPLE_MARKER, atomic_directory, example_files

    claim(out_dir, option="OUT_DIR", inputs=(), force=force, ours=example_files, directory=True)
    with atomic_directory(out_dir, force) as tmp:
        write_example(tmp, kind, family, tied=tied)
        flag = " --tied" if tied else ""
        (tmp / EXAMPLE_MARKER).write_text(f"written by adafuse-export make-example --kind {kind} --family {family}{flag}\n")
    emit(f"wrote {kind} example ({family}{', tied head' if tied else ''}) to {out_dir}")
