"""The seeds' CustomLSTMCell (shared/seeds/002_*), written in torch as in the seed: the
origin of fastlstm's peephole="full". Shared by the reference and the variant tests."""

import numpy as np
import torch


class CustomLSTMCell(torch.nn.Module):
    """The seeds' cell: every gate from W_*([x, h]) + U_*(c); the o gate reads the NEW c_t."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        for gate in "fico":
            linear = torch.nn.Linear(input_size + hidden_size, hidden_size, dtype=torch.float64)
            setattr(self, f"W_{gate}", linear)
            setattr(
                self, f"U_{gate}", torch.nn.Linear(hidden_size, hidden_size, dtype=torch.float64)
            )

    def forward(self, x, init_states):
        h_t, c_t = init_states
        f_t = torch.sigmoid(self.W_f(torch.cat([x, h_t], dim=1)) + self.U_f(c_t))
        i_t = torch.sigmoid(self.W_i(torch.cat([x, h_t], dim=1)) + self.U_i(c_t))
        g_t = torch.tanh(self.W_c(torch.cat([x, h_t], dim=1)) + self.U_c(c_t))
        c_t = f_t * c_t + i_t * g_t
        o_t = torch.sigmoid(self.W_o(torch.cat([x, h_t], dim=1)) + self.U_o(c_t))
        h_t = o_t * torch.tanh(c_t)
        return h_t, c_t

    def gates(self):
        """(W, U) layers in fastlstm's gate order i, f, g, o."""
        W = [self.W_i, self.W_f, self.W_c, self.W_o]
        U = [self.U_i, self.U_f, self.U_c, self.U_o]
        return W, U

    def fastlstm_params(self, suffix=""):
        """The mapping: W_* split at input_size, U_* stacked, bias_hh = 0."""
        W, U = self.gates()
        i = self.input_size

        def stack(tensors):
            return torch.cat(tensors).detach().numpy().copy()

        return {
            f"weight_ih{suffix}": stack([w.weight[:, :i] for w in W]),
            f"weight_hh{suffix}": stack([w.weight[:, i:] for w in W]),
            f"bias_ih{suffix}": stack([w.bias for w in W]),
            f"bias_hh{suffix}": np.zeros(4 * self.hidden_size),
            f"weight_ch{suffix}": stack([u.weight for u in U]),
            f"bias_ch{suffix}": stack([u.bias for u in U]),
        }

    def gradients(self, suffix=""):
        """torch's gradients under fastlstm's names (bias_hh sits where bias_ih does)."""
        W, U = self.gates()
        i = self.input_size
        bias = torch.cat([w.bias.grad for w in W])
        return {
            f"weight_ih{suffix}": torch.cat([w.weight.grad[:, :i] for w in W]),
            f"weight_hh{suffix}": torch.cat([w.weight.grad[:, i:] for w in W]),
            f"bias_ih{suffix}": bias,
            f"bias_hh{suffix}": bias,
            f"weight_ch{suffix}": torch.cat([u.weight.grad for u in U]),
            f"bias_ch{suffix}": torch.cat([u.bias.grad for u in U]),
        }
