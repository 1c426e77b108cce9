"""nni-idarts: differentiable architecture search with stochastic implicit gradients (iDARTS) for NNI 3.0."""

import warnings

# NNI 3.0 warns on import about two module types of recent PyTorch (harmless, see nni/nas/nn/pytorch/layers.py);
# silenced here, before NNI is imported, so that it does not bury the command line's one-line error messages.
warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module', category=RuntimeWarning)

from .module import IDartsLightningModule, NonFiniteHypergradientError, NonFiniteStepError  # noqa: E402
from .second_order import SecondOrderUnsupportedError  # noqa: E402
from .strategy import IDartsStrategy  # noqa: E402

__all__ = ['IDartsStrategy', 'IDartsLightningModule', 'NonFiniteHypergradientError', 'NonFiniteStepError',
           'SecondOrderUnsupportedError']
__version__ = '0.1.0'
