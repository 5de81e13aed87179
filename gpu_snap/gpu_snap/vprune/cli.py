"""`vprune demo | bench <what> | eval <what> | info`.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only routes, so ``vprune info`` starts fast and a missing optional dependency of one
benchmark never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional

# (group, name) -> module. group "" is a top-level command.
COMMANDS: Dict[tuple, str] = {
    ("", "info"): "vprune.info",
    ("", "demo"): "vprune.demo",
    ("bench", "kernels"): "vprune.bench.kernels",
    ("bench", "dlm"): "vprune.bench.dlm",
    ("bench", "nat"): "vprune.bench.nat",
    ("bench", "vlm"): "vprune.bench.vlm",
    ("bench", "vla"): "vprune.bench.vla",
    ("eval", "vla"): "vprune.evaluation.vla",
    ("eval", "dlm"): "vprune.evaluation.dlm",
    ("eval", "nat"): "vprune.evaluation.nat",
    ("eval", "vlm"): "vprune.evaluation.vlm",
}

_HELP = {
    "info": "supported host classes, techniques, strategies and versions found",
    "demo": "run the shipped testbed robot policy unpruned and pruned (no download)",
    "bench": "speed benchmarks (kernels, dlm, nat, vlm, vla)",
    "eval": "quality evaluations on the shipped testbed models (vla, dlm, nat, vlm)",
}


def _available(group: str, name: str) -> bool:
    try:
        return importlib.util.find_spec(COMMANDS[(group, name)]) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    groups: Dict[str, argparse._SubParsersAction] = {}
    for (group, name), module in COMMANDS.items():
        if not _available(group, name):
            continue
        mod = importlib.import_module(module)
        if group == "":
            p = sub.add_parser(name, help=_HELP.get(name), description=mod.__doc__)
        else:
            if group not in groups:
                gp = sub.add_parser(group, help=_HELP.get(group))
                groups[group] = gp.add_subparsers(dest="what", required=True)
            p = groups[group].add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                                         description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
