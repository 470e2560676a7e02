"""Average the weights of teacher checkpoints of one lineage (a "model soup": the stage-3 runs both
start from the shipped teacher), tried in issue 25 as a cheap way to a teacher that generalizes better.

    python bench/denoise/weight_average.py OUT.pt CHECKPOINT [CHECKPOINT ...]

Every floating-point tensor of the state dict is averaged in float64, BatchNorm running statistics
included (an approximation: a soup's true statistics would need a pass over data); integer buffers
are taken from the first checkpoint. OUT is written atomically; it loads wherever a checkpoint does.
"""
import sys
from pathlib import Path

from pycosdist.denoise.checkpoint import load_checkpoint, save_checkpoint


def average(states: list[dict]) -> dict:
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(first.dtype)
        else:
            out[key] = first
    return out


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, paths = Path(sys.argv[1]), sys.argv[2:]
    try:
        ckpts = [load_checkpoint(p) for p in paths]
    except (FileNotFoundError, ValueError) as e:  # a missing or foreign file, named
        sys.exit(f"weight_average: {e}")
    if any(c["model_config"] != ckpts[0]["model_config"] for c in ckpts):
        sys.exit("the checkpoints are of different architectures (model_config differs)")
    soup = {"format": ckpts[0]["format"], "version": ckpts[0]["version"], "config": ckpts[0]["config"],
            "model_config": ckpts[0]["model_config"], "model": average([c["model"] for c in ckpts]),
            "kd": None, "epoch": 0, "history": [], "best": {}, "averaged_from": paths}
    save_checkpoint(soup, out)
    print(f"wrote {out}: the average of {len(paths)} checkpoints")


if __name__ == "__main__":
    main()
