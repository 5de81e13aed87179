"""Supported host classes, techniques, strategies, kernels and the library versions found."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
from typing import Any, Dict


def collect() -> Dict[str, Any]:
    """Everything ``vprune info`` prints, as a dict."""
    import vprune
    from vprune.config import NAT_MODES, VISUAL_STRATEGIES
    from vprune.integrations.registry import integrations_table

    versions: Dict[str, str] = {"python": platform.python_version(), "vprune": vprune.__version__}
    for name in ("torch", "transformers", "timm", "triton", "diffusers", "numpy"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:
            versions[name] = "not installed"
    import torch
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "versions": versions,
        "cuda_device": cuda,
        "techniques": {
            "visual_pruning": {"strategies": list(VISUAL_STRATEGIES)},
            "window_diffusion": {},
            "nat_cache": {"modes": list(NAT_MODES)},
        },
        "kernels": {"VPRUNE_KERNELS": os.environ.get("VPRUNE_KERNELS", "auto (triton on CUDA, torch elsewhere)"),
                    "triton": versions["triton"]},
        "hosts": integrations_table(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"cuda device: {info['cuda_device']}")
    for tech, extra in info["techniques"].items():
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in extra.items())
        print(f"technique {tech}" + (f" ({detail})" if detail else ""))
    print(f"kernels: {info['kernels']}")
    print(f"{'host class':40s} {'integration':12s} {'techniques':28s} tested on")
    for row in info["hosts"]:
        if "error" in row:
            print(f"{row['host_class']:40s} import failed: {row['error']}")
            continue
        print(f"{row['host_class']:40s} {row['name']:12s} {', '.join(row['techniques']):28s} {row['tested_on']}")
    return 0
