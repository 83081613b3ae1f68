"""The kernel layer: every @njit function of fastlstm, and nothing else.

Modules, bottom up: :mod:`~fastlstm._kernels.tiles` (the register-blocked micro-kernel,
generated in LLVM IR for the CPU's vectors), :mod:`~fastlstm._kernels.packing` (weights
into its panels), :mod:`~fastlstm._kernels.products` (the tile over every panel and row
block), :mod:`~fastlstm._kernels.activations` and :mod:`~fastlstm._kernels.gates` (the
element-wise step), :mod:`~fastlstm._kernels.blas` (BLAS GEMMs from compiled code),
:mod:`~fastlstm._kernels.sync` (the per-step barrier), then the drivers the engine calls:
:mod:`~fastlstm._kernels.forward`, :mod:`~fastlstm._kernels.backward`,
:mod:`~fastlstm._kernels.gradients`, :mod:`~fastlstm._kernels.stream` (streaming) and
:mod:`~fastlstm._kernels.probes` (parts of a loop alone, for the profiler). The drivers
are importable from this package.

Equations (one direction; gate order i, f, g, o as in PyTorch; row vectors, batch rows):

    a_t = x_t W_ih^T + h_{t-1} W_hh^T + (b_ih + b_hh)                      4H values
      diagonal peephole: a_i += p_i c_{t-1},  a_f += p_f c_{t-1},  a_o += p_o c_t
      full peephole:     a_ifg += c_{t-1} W_ch[ifg]^T,  a_o += c_t W_ch[o]^T  (b_ch is in the bias)
    i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
    c_t = f c_{t-1} + i g       m_t = o tanh(c_t)       h_t = m_t W_hr^T (projection) or m_t

Layout. Gate values are kept *gate-major*: ``xp[d, gate, t]`` is one contiguous vector of
B*H values (row b at b*H). So for any chunk of batch rows, each gate block of a step is a
single contiguous slice and the gate math is a few long flat loops per step (vectorised
after LLVM's runtime alias checks, paid once per step rather than per row, in gate-pass
functions of their own). Each step's recurrent product is one register-blocked product
for all four gates straight into the gate blocks (:mod:`fastlstm._kernels.products`).
Nothing is allocated inside a time loop.

Conventions: kernels never validate; outputs first, then inputs, then sizes and flags.
Arrays are C-contiguous in the model's dtype; optional weights are empty arrays.
Sizes: T steps, B batch rows, H hidden, P = H_out (projection size or H), G = 4H, D directions.

    xp      (D, 4, T, B*H) forward: input projection + bias in (or made by the loop),
                           activated gates out; backward: overwritten with dL/da.
                           Inference with the projection in the loop: (D, 4, 1, B*H)
    out     (T, B, D*P)    layer output (zero at padded steps)
    h0, h_n (D, B, P)      c0, c_n (D, B, H)
    w_ih    (D, G, I)      w_hh (D, G, P)     w_hr (D, P, H) or (D, 0, 0)
    peep    (D, 3, H) or (D, 0, 0)   rows i, f, o        w_ch (D, G, H) or (D, 0, 0)
    lengths (B,) int64     steps t >= lengths[b] are padding: state carried, output zero
    xh      (D, T*B, I+P)  training: what each step read, row t*B + b = [x_t | h_{t-1}]
                           (the engine fills the x part, the loops the h part; for the
                           weight gradients, and the fused loop's product reads it)
    cstate  (D, T, B*H)    training: the cell after each step
    mstore  (D, T, B, H)   training with projection: m_t (for dW_hr)
    dhstore (D, T, B, P)   backward with projection: dL/dh_t (for dW_hr)

Direction d = 1 runs t = T-1 down to 0, each sequence over its own valid steps. Padded
rows are computed like the others (their inputs are zero) and then put back: the state is
carried, the output zeroed, and in backward their gradient is dropped.
"""

from fastlstm._kernels.backward import (
    layer_backward_one_row,
    layer_backward_rows,
    layer_backward_units,
)
from fastlstm._kernels.forward import (
    layer_forward_one_row,
    layer_forward_rows,
    layer_forward_units,
    one_row_inputs,
    project_inputs,
    project_inputs_packed,
)
from fastlstm._kernels.gradients import extra_weight_gradients, weight_gradients
from fastlstm._kernels.probes import one_row_products_only, recurrent_products_only

__all__ = [
    "extra_weight_gradients",
    "layer_backward_one_row",
    "layer_backward_rows",
    "layer_backward_units",
    "layer_forward_one_row",
    "layer_forward_rows",
    "layer_forward_units",
    "one_row_inputs",
    "one_row_products_only",
    "project_inputs",
    "project_inputs_packed",
    "recurrent_products_only",
    "weight_gradients",
]
