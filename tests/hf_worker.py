"""Run under torchrun by tests/test_hf.py: DistillationTrainer steps on CPU processes (DDP), then
``save_model`` (rank 0 writes the whole student) and how it ran."""
import json
import sys
from pathlib import Path

from tests.test_hf import trainer_for

if __name__ == "__main__":
    options, out = json.loads(sys.argv[1]), sys.argv[2]
    trainer = trainer_for(out, data_size=options.pop("data_size"), **options)
    trainer.train()
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        Path(out, "ran.json").write_text(json.dumps({"processes": trainer.accelerator.num_processes,
                                                     "wrapper": type(trainer.model_wrapped).__name__}))
