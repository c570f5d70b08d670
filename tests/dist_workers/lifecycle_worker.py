"""A world-of-one training run that records the colocated lifecycle calls, in order.

    python tests/dist_workers/lifecycle_worker.py OUT.json --config configs/test_tiny.yaml key=value ...

Wraps (and still calls) the calls that move memory between the trainer and colocated engines:
the engines' start (`Rollout.start`), their release / resume of weights and KV cache, the
weight push (`Rollout.prepare_colocated`), the train state's offload / restore and the
checkpoint save; runs `megatron_qae.train.main` with the remaining arguments and writes the
names in call order to OUT.json.
"""

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.persistence import checkpoint  # noqa: E402
from megatron_qae.run.rollout import Rollout  # noqa: E402
from megatron_qae.sync import placement  # noqa: E402

CALLS: list[str] = []


def recorded(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tags = kwargs.get("tags", args[-1] if name == "resume" and args else None)
        CALLS.append(f"{name}:{','.join(tags)}" if name == "resume" else name)
        return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    Rollout.start = classmethod(recorded(Rollout.start.__func__, "start_engines"))
    Rollout.release_memory = recorded(Rollout.release_memory, "release")
    Rollout.resume_memory = recorded(Rollout.resume_memory, "resume")
    Rollout.prepare_colocated = recorded(Rollout.prepare_colocated, "push")
    placement.offload_train_state = recorded(placement.offload_train_state, "offload")
    placement.restore_train_state = recorded(placement.restore_train_state, "restore")
    checkpoint.save_checkpoint = recorded(checkpoint.save_checkpoint, "save")
    from megatron_qae import train

    train.main(argv)
    out.write_text(json.dumps(CALLS))


if __name__ == "__main__":
    main()
