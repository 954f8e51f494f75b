"""Run a few distillation steps (under torchrun or alone) and write losses and final weights.

Usage: python ddp_worker.py CONFIG.yaml OUT_PREFIX
"""

from __future__ import annotations

import json
import os
import sys

from safetensors.torch import save_file

from lmdistill.config import load_config
from lmdistill.train.run import build_trainer


def main() -> None:
    config_path, out = sys.argv[1], sys.argv[2]
    trainer, _ = build_trainer(load_config(config_path), show_progress=False)
    losses = [trainer.train_step(step) for step in range(trainer.tc.steps)]
    acc = trainer.accelerator
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        # learned objective parameters (representation projections) must match one process too
        weights.update({f"objective.{i}": p.detach().contiguous() for i, p in enumerate(trainer.objective.parameters())})
        save_file(weights, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"losses": losses, "world_size": acc.num_processes}, f)
    trainer.close()
    # Results are written: leave without interpreter teardown. A gloo group alive at teardown aborted a run once
    # ("terminate called without an active exception"), and destroying it at the end hung once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
