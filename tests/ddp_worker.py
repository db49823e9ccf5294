"""Run as two processes by tests/test_ddp.py and tests/test_causal_lm.py (tests/helpers.run_two_processes):
train from a JSON config, then save this rank's weights."""
import json
import os
import sys

from safetensors.torch import save_file

from pcdistill.config import from_dict
from pcdistill.engine.trainer import train
from tests.helpers import init_process_group

if __name__ == "__main__":
    config, out = json.loads(sys.argv[1]), sys.argv[2]
    init_process_group()  # train() then uses this group
    summary = train(from_dict(config), out)
    state = {k: v.detach().contiguous() for k, v in summary.student.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
