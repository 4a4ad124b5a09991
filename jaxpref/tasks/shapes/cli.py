"""The shapes task's commands, mounted by jaxpref/cli.py:

    jaxpref demo [--quick] [--out DIR]      the whole pipeline, with a report
    jaxpref data shapes --out DIR           the task's datasets
    jaxpref tower --out DIR                 a vision tower pretrained on the scenes
    jaxpref reads --policy DIR              what a model reads off the image
"""

from __future__ import annotations

from jaxpref.tasks.shapes.data import add_shapes_data_parser
from jaxpref.tasks.shapes.demo import add_demo_parser
from jaxpref.tasks.shapes.reads import add_reads_parser
from jaxpref.tasks.shapes.tower import add_tower_parser


def add_parsers(subparsers, data_subparsers):
    """Registers the task's commands under `jaxpref` and `jaxpref data`."""
    add_demo_parser(subparsers)
    add_shapes_data_parser(data_subparsers)
    add_tower_parser(subparsers)
    add_reads_parser(subparsers)
