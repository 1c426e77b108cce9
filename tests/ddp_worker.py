"""One small search, single-process or as one rank of Lightning DDP; dumps what every step did (for test_ddp.py).

    python tests/ddp_worker.py OUT_DIR ddp 8        # Lightning strategy='ddp': 2 CPU processes on gloo, 8 samples each
    python tests/ddp_worker.py OUT_DIR single 16    # one process, the same global batches of 16 in the same order
    python tests/ddp_worker.py OUT_DIR ddp_warmup 8 # 'ddp' with a first epoch of weight steps only (alphas frozen)

Under 'ddp' Lightning starts rank 1 by running this same command line again (with LOCAL_RANK=1). Each process writes
``OUT_DIR/<mode>_rank<r>.json``: the per-batch records of :class:`search_probes.StepRecorder` and the export.
Under 'ddp' rank 1 deliberately starts from other weights and other alphas: the search must make them rank 0's.
"""

from __future__ import annotations

import json
import os
import sys

import pytorch_lightning as pl
import torch
from torch.utils.data import DistributedSampler, Subset

from nni_idarts import IDartsStrategy
from nni_idarts.checkpoint import SeededEpochSampler
from nni_idarts.data import digits_splits
from nni_idarts.search import search
from search_probes import StepRecorder, TinySpace

#: Samples per split: 2 ranks x 8 per step divide it evenly, so the distributed sampler adds no padding.
N_SAMPLES = 64
SEED = 0
WORLD_SIZE = 2


def distributed_order(n: int, data_seed: int) -> list[int]:
    """The global sample order of epoch 0 under DDP (rank r takes positions r::R of it).

    search() shuffles with its own SeededEpochSampler(n, data_seed); under DDP Lightning wraps that sampler in a
    DistributedSamplerWrapper, which permutes the sampler's epoch order once more with DistributedSampler(seed)."""
    inner = list(SeededEpochSampler(n, data_seed))
    return [inner[i] for i in DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=SEED)]


class DesyncAlphas(pl.Callback):
    """Shifts the alphas on every rank but 0 just before the module's own on_fit_start (callbacks run first)."""

    def on_fit_start(self, trainer, pl_module) -> None:  # type: ignore[override]
        if trainer.global_rank != 0:
            with torch.no_grad():
                for alpha in pl_module.arch_parameters():
                    alpha.add_(1.0)


def main(out_dir: str, mode: str, batch_size: int) -> None:
    splits = digits_splits(SEED)
    train, val = Subset(splits.train, range(N_SAMPLES)), Subset(splits.val, range(N_SAMPLES))
    recorder = StepRecorder()
    trainer_kwargs = {'callbacks': [recorder], 'enable_progress_bar': False, 'enable_model_summary': False}
    rank = int(os.environ.get('LOCAL_RANK', 0))
    epochs, warmup_epochs = (2, 1) if mode == 'ddp_warmup' else (1, 0)
    if mode in ('ddp', 'ddp_warmup'):
        trainer_kwargs.update(strategy='ddp', devices=WORLD_SIZE, accelerator='cpu')
        trainer_kwargs['callbacks'].append(DesyncAlphas())
        shuffle = True  # Lightning wraps search()'s sampler in a DistributedSamplerWrapper: see distributed_order
    elif mode == 'single':
        # Global batch t of the DDP run is positions [t*2b, (t+1)*2b) of distributed_order: replay that order.
        # (search() seeds the train loader with seed and the val loader with seed + 1.)
        train = Subset(train, distributed_order(len(train), SEED))
        val = Subset(val, distributed_order(len(val), SEED + 1))
        shuffle = False
    else:
        raise SystemExit(f'unknown mode {mode!r}')
    torch.manual_seed(SEED + rank)  # under DDP, rank 1 builds other weights than rank 0
    strategy = IDartsStrategy(hypergradient='implicit', K=2, inner_steps=1, arc_learning_rate=0.05,
                              warmup_epochs=warmup_epochs)
    result = search(TinySpace(), train, val, strategy, epochs=epochs, batch_size=batch_size, learning_rate=0.1,
                    seed=SEED, trainer_kwargs=trainer_kwargs, shuffle=shuffle)
    with open(os.path.join(out_dir, f'{mode}_rank{rank}.json'), 'w') as f:
        json.dump({'initial': recorder.initial, 'steps': recorder.steps, 'arch': result.arch, 'probs': result.probs}, f)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
