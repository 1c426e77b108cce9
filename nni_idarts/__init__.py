"""nni-idarts: differentiable architecture search with stochastic implicit gradients (iDARTS) for NNI 3.0."""

from .module import IDartsLightningModule, NonFiniteHypergradientError, NonFiniteStepError
from .strategy import IDartsStrategy

__all__ = ['IDartsStrategy', 'IDartsLightningModule', 'NonFiniteHypergradientError', 'NonFiniteStepError']
__version__ = '0.1.0'
