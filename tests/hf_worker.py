"""Run as two processes by tests/test_hf.py (tests/helpers.run_two_processes): DistillationTrainer steps on
CPU processes (DDP), then ``save_model`` (rank 0 writes the whole student) and how it ran."""
import json
import sys
from pathlib import Path

from tests.helpers import init_process_group
from tests.test_hf import trainer_for

if __name__ == "__main__":
    options, out = json.loads(sys.argv[1]), sys.argv[2]
    init_process_group()  # accelerate then uses this group
    trainer = trainer_for(out, data_size=options.pop("data_size"), **options)
    trainer.train()
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        Path(out, "ran.json").write_text(json.dumps({"processes": trainer.accelerator.num_processes,
                                                     "wrapper": type(trainer.model_wrapped).__name__}))
