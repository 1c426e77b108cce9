"""NNI model spaces for nni-idarts. Each is a plain ``nni.nas.nn.pytorch.ModelSpace``, usable by any NNI strategy."""

from .digits import DigitsCellSpace, DIGITS_OPS

__all__ = ['DigitsCellSpace', 'DIGITS_OPS']
