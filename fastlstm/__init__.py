"""fastlstm: a NumPy-native LSTM whose gate math runs in Numba kernels.

Same numbers as ``torch.nn.LSTM`` for the same weights, no deep-learning framework at run time.
"""

from fastlstm import optim
from fastlstm._module import Module
from fastlstm._threads import get_num_threads, set_num_threads
from fastlstm.linear import Linear
from fastlstm.loss import mse_loss
from fastlstm.lstm import LSTM, LSTMCell
from fastlstm.optim import clip_grad_norm
from fastlstm.stream import CellStream, Stream

__all__ = [
    "LSTM",
    "CellStream",
    "LSTMCell",
    "Linear",
    "Module",
    "clip_grad_norm",
    "get_num_threads",
    "mse_loss",
    "optim",
    "set_num_threads",
    "Stream",
]
__version__ = "0.1.0"
