"""fastlstm: a NumPy-native LSTM whose gate math runs in Numba kernels.

Same numbers as ``torch.nn.LSTM`` for the same weights, no deep-learning framework at run time.
"""

from fastlstm._module import Module

__all__ = ["Module"]
__version__ = "0.1.0"
