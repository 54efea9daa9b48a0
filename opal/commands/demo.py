"""`opal demo`: the whole pipeline on embedded defaults (broker, valkey, vLLM, worker), printed as it goes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from opal.commands.common import console, sigterm_as_interrupt
from opal.samples import SAMPLE_DIR


def demo(
    samples: Annotated[Path, typer.Option(help="Sample folder.")] = SAMPLE_DIR,
    loop: Annotated[
        bool, typer.Option(help="Then one improvement round: judge, preference pairs, DPO, gate, promotion, re-enrichment.")
    ] = False,
) -> None:
    """Run the whole pipeline on embedded defaults (broker, valkey, vLLM, worker) and print what happened."""
    sigterm_as_interrupt()
    from opal.demo import print_result, run_demo

    print_result(console, run_demo(console, samples, loop=loop))
