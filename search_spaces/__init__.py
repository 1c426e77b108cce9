"""NNI model spaces for nni-idarts. Each is a plain ``nni.nas.nn.pytorch.ModelSpace``, usable by any NNI strategy."""

from .digits import DIGITS_OPS, DigitsCellSpace, DigitsMLPSpace

__all__ = ['DigitsCellSpace', 'DigitsMLPSpace', 'DIGITS_OPS']
