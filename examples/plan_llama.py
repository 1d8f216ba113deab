"""What is the cheapest way to make a Llama-2-7B fine-tune fit one A100-80GB? (issue 12)

``memguard check llama-2-7b --batch-size 4 --seq-len 2048 --precision bf16-mixed --gpu A100-80GB``
needs about 150-160 GiB where 72 GiB are usable; a smaller batch or checkpointing alone does not fit
(parameters and AdamW state are 75 GiB by themselves). This prints what does fit, ranked by a stated
cost model, with the flags that reproduce each row with ``memguard check``: the formula searches,
and every row shown is traced (only those: each group's candidates are traced cheapest first until
six fit). Runs on a CPU, without a GPU (minutes on 2 cores: a Llama-2-7B trace takes ~17 s of CPU).

    python examples/plan_llama.py [--gpus N]
"""

from __future__ import annotations

import argparse
import logging
import warnings

import memguard
from memguard.planning import plan, remedies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=1, help="the most GPUs to consider (default: 1)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # transformers' notes about the config, not ours
    logging.getLogger("transformers").setLevel(logging.ERROR)

    result = plan("llama-2-7b", seq_len=2048, gpu="A100-80GB", gpus=args.gpus, batch_size=4,
                  base={"precision": "bf16-mixed"}, limit=6)
    print(result.table(top=6))

    # What `memguard check` and the callback will say on failure: the best three rows that fit,
    # traced like the check's own estimate.
    asked = memguard.estimate("llama-2-7b", 4, 2048, precision="bf16-mixed")
    print()
    print(f"remedies for the check that failed ({memguard.format_bytes(asked.total_bytes)}, {asked.method}):")
    for row in remedies(asked, memguard.device_memory("A100-80GB"), 0.1):
        print(f"  - {row.describe()}")


if __name__ == "__main__":
    main()
