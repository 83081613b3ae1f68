"""Models in and out: ONNX's ``LSTM`` operator and Keras's LSTM layers.

:mod:`fastlstm.interop.onnx_io` reads and writes ONNX graphs (the ``onnx`` package, imported
only when called); :mod:`fastlstm.interop.keras_io` reads Keras layers, models and their
``.keras`` / ``.h5`` files (files with ``h5py`` only, never Keras or TensorFlow). Both are
reached through ``LSTM.from_onnx``, ``LSTM.to_onnx`` and ``LSTM.from_keras``.
"""
