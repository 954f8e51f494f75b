"""Run the `cache-teacher` command function (under torchrun or alone). Usage: python torchrun_cache.py CONFIG.yaml"""

from __future__ import annotations

import sys
from pathlib import Path

from lmdistill.cli.cache import cache_teacher

if __name__ == "__main__":
    cache_teacher(Path(sys.argv[1]), None)
