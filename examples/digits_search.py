"""Search scikit-learn's digits with IDartsStrategy through NNI's NasExperiment, on CPU in well under a minute.

    python examples/digits_search.py [--space mlp|cell] [--epochs 5] [--hypergradient implicit]

``mlp`` (default) uses every NNI choice kind: a LayerChoice, an InputChoice and an ``nni.choice`` layer width;
``cell`` is the 3-edge NAS-Bench-201-style cell space. Prints the exported architecture and its probabilities.
"""

from __future__ import annotations

import argparse
import json

from nni_idarts import IDartsStrategy
from nni_idarts.data import digits_splits
from nni_idarts.search import search
from search_spaces import DigitsCellSpace, DigitsMLPSpace


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--space', choices=['mlp', 'cell'], default='mlp')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--hypergradient', default='implicit', choices=['implicit', 'unrolled', 'first_order'])
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    splits = digits_splits(seed=args.seed)
    space = DigitsMLPSpace() if args.space == 'mlp' else DigitsCellSpace()
    strategy = IDartsStrategy(hypergradient=args.hypergradient, arc_learning_rate=3e-3)
    result = search(space, splits.train, splits.val, strategy, epochs=args.epochs, seed=args.seed)
    print('exported architecture:', json.dumps(result.arch, sort_keys=True))
    for label, probs in result.probs.items():
        print(f'  {label}: ' + ', '.join(f'{choice}={p:.3f}' for choice, p in probs.items()))
    return result.arch


if __name__ == '__main__':
    main()
