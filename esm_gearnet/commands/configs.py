"""`esm-gearnet configs`: the configs that ship with the package, one name a line, for `-c NAME`.

    esm-gearnet configs
"""
from __future__ import annotations

from typing import List, Optional

from ..config import CONFIGS, packaged_configs
from .arguments import configs_parser


def main(argv: Optional[List[str]] = None) -> int:
    configs_parser().parse_args(argv)
    print(f"# the configs in {CONFIGS}; give one as -c NAME from any folder, e.g. -c EC/esm_gearnet.yaml")
    for name in packaged_configs():
        print(name)
    return 0
