"""Build a teacher cache from a JSON spec, pausing after each shard (so a test can kill it midway).

Usage: python cache_worker.py SPEC.json
"""

from __future__ import annotations

import json
import sys
import time

from lmdistill.data.prepare import prepare_data
from lmdistill.data.tokenizer import load_tokenizer
from lmdistill.models.loading import load_causal_lm
from lmdistill.teachers.cache import write_teacher_cache


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    tokenizer = load_tokenizer(spec["tokenizer"])
    data = prepare_data(spec["corpus"], block_size=32, tokenizer=tokenizer, cache_dir=spec["cache_dir"])
    write_teacher_cache(
        spec["output"], model=load_causal_lm(spec["teacher"]), tokenizer=tokenizer, stream=data.streams["train"],
        block_size=32, k=spec["k"], blocks_per_shard=spec["blocks_per_shard"], model_name="tiny",
        on_shard_written=lambda shard: time.sleep(spec["sleep"]),
    )


if __name__ == "__main__":
    main()
