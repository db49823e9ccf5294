"""Run under torchrun by tests/test_ddp.py: train from a JSON config, then save this rank's weights."""
import json
import os
import sys

from safetensors.torch import save_file

from pcdistill.config import from_dict
from pcdistill.engine.trainer import train

if __name__ == "__main__":
    config, out = json.loads(sys.argv[1]), sys.argv[2]
    summary = train(from_dict(config), out)
    state = {k: v.detach().contiguous() for k, v in summary.student.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
