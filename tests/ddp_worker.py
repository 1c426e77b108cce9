"""One small search, single-process or as one rank of Lightning DDP; dumps what every step did (for test_ddp.py).

    python tests/ddp_worker.py OUT_DIR ddp 8        # Lightning strategy='ddp': 2 CPU processes on gloo, 8 samples each
    python tests/ddp_worker.py OUT_DIR single 16    # one process, the same global batches of 16 in the same order

Under 'ddp' Lightning starts rank 1 by running this same command line again (with LOCAL_RANK=1). Each process writes
``OUT_DIR/<mode>_rank<r>.json``: the per-batch records of :class:`search_probes.StepRecorder` and the export.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.data import DistributedSampler, Subset

from nni_idarts import IDartsStrategy
from nni_idarts.data import digits_splits
from nni_idarts.search import search
from search_probes import StepRecorder, TinySpace

#: Samples per split: 2 ranks x 8 per step divide it evenly, so the distributed sampler adds no padding.
N_SAMPLES = 64
SEED = 0
WORLD_SIZE = 2


def distributed_order(n: int) -> list[int]:
    """The global sample order of epoch 0 that Lightning's DistributedSampler shards (rank r takes positions r::R)."""
    return list(DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=SEED))


def main(out_dir: str, mode: str, batch_size: int) -> None:
    splits = digits_splits(SEED)
    train, val = Subset(splits.train, range(N_SAMPLES)), Subset(splits.val, range(N_SAMPLES))
    recorder = StepRecorder()
    trainer_kwargs = {'callbacks': [recorder], 'enable_progress_bar': False, 'enable_model_summary': False}
    if mode == 'ddp':
        trainer_kwargs.update(strategy='ddp', devices=WORLD_SIZE, accelerator='cpu')
        shuffle = True  # Lightning replaces the sampler by a DistributedSampler(shuffle=True, seed=SEED)
    elif mode == 'single':
        # Global batch t of the DDP run is positions [t*2b, (t+1)*2b) of distributed_order: replay that order.
        train, val = Subset(train, distributed_order(len(train))), Subset(val, distributed_order(len(val)))
        shuffle = False
    else:
        raise SystemExit(f'unknown mode {mode!r}')
    torch.manual_seed(SEED)
    strategy = IDartsStrategy(hypergradient='implicit', K=2, inner_steps=1, arc_learning_rate=0.05)
    result = search(TinySpace(), train, val, strategy, epochs=1, batch_size=batch_size, learning_rate=0.1,
                    seed=SEED, trainer_kwargs=trainer_kwargs, shuffle=shuffle)
    rank = int(os.environ.get('LOCAL_RANK', 0))
    with open(os.path.join(out_dir, f'{mode}_rank{rank}.json'), 'w') as f:
        json.dump({'initial': recorder.initial, 'steps': recorder.steps, 'arch': result.arch, 'probs': result.probs}, f)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
