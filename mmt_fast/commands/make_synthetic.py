"""``mmt-fast make-synthetic``: write a synthetic audio-video dataset (mp4 clips and a
manifest; label = motion x pitch). Every option belongs to the generator
(:func:`mmt_fast.data.synthetic.main`, ``mmt-fast make-synthetic --help``)."""

from __future__ import annotations

import argparse

HELP = "write a synthetic audio-video dataset (mp4 clips + manifest)"
DESCRIPTION = None
#: the generator parses its own options, --help included
OWN_HELP = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    from mmt_fast.data.synthetic import main

    return main(args.args)
