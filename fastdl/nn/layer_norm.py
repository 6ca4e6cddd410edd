"""Drop-in torch.nn.LayerNorm / torch.nn.RMSNorm, and their fused residual-add forms.

AddLayerNorm / AddRMSNorm are the pre-norm Transformer's "x + sublayer(x)" followed by the
next sublayer's norm, in one pass over memory:

    class PreNormBlock(torch.nn.Module):           # h = x + attn(norm1(x)); out = h + mlp(norm2(h))
        def __init__(self, d):
            super().__init__()
            self.norm1, self.attn = fastdl.nn.LayerNorm(d), Attention(d)
            self.norm2, self.mlp = fastdl.nn.AddLayerNorm(d), MLP(d)
        def forward(self, x):
            h, normed = self.norm2(x, self.attn(self.norm1(x)))   # h = x + attn(...), normed = norm2(h)
            return h + self.mlp(normed)

They have the parameters and state_dict keys of LayerNorm / RMSNorm.
"""
import torch

from fastdl import ops
from fastdl.backends import BackendUnavailableError
from fastdl.nn._fallback import FastModule, fall_back


class LayerNorm(FastModule, torch.nn.LayerNorm):
    """torch.nn.LayerNorm on fastdl's kernels. `strict=True` raises instead of falling back."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None, *,
                 strict: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.strict = strict

    def forward(self, input):
        try:
            return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        except BackendUnavailableError as exc:
            return fall_back(self, exc, super().forward, input)


class RMSNorm(FastModule, torch.nn.RMSNorm):
    """torch.nn.RMSNorm on fastdl's kernels. `strict=True` raises instead of falling back."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 strict: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.strict = strict

    def forward(self, input):
        try:
            return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        except BackendUnavailableError as exc:
            return fall_back(self, exc, super().forward, input)


class AddLayerNorm(LayerNorm):
    """forward(x, residual) -> (x + residual, layer_norm(x + residual)), fused."""

    def forward(self, x, residual):
        try:
            return ops.add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps)
        except BackendUnavailableError as exc:
            return fall_back(self, exc, self._unfused, x, residual)

    def _unfused(self, x, residual):
        h = x + residual
        return h, torch.nn.LayerNorm.forward(self, h)


class AddRMSNorm(RMSNorm):
    """forward(x, residual) -> (x + residual, rms_norm(x + residual)), fused."""

    def forward(self, x, residual):
        try:
            return ops.add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps)
        except BackendUnavailableError as exc:
            return fall_back(self, exc, self._unfused, x, residual)

    def _unfused(self, x, residual):
        h = x + residual
        return h, torch.nn.RMSNorm.forward(self, h)


class PreNormSequence(torch.nn.Module):
    """A pre-norm residual stack: for each sublayer f_i, x <- x + f_i(norm_i(x)); then a
    final norm (GPT-2's ln_f) when final_norm. Every residual add is fused into the norm
    that follows it, so each add costs no extra pass over memory:

        h, normed = x, norms[0](x)
        for i, f in enumerate(sublayers):
            h, normed = add_norm_{i+1}(h, f(normed))   # h + f(normed), and its norm

    sublayers: modules mapping (..., d_model) -> (..., d_model), e.g. [attention, mlp] * n_layers.
    norm: "layer" (LayerNorm) or "rms" (RMSNorm); norm_kwargs go to every norm (eps, bias...).
    The norms live in `self.norms` (len(sublayers) + final_norm of them).
    """

    def __init__(self, d_model, sublayers, norm="layer", final_norm=True, device=None, dtype=None, **norm_kwargs):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"fastdl.nn.PreNormSequence: argument norm must be 'layer' or 'rms', got {norm!r}")
        if len(sublayers) == 0:
            raise ValueError("fastdl.nn.PreNormSequence: argument sublayers is empty")
        fused = AddLayerNorm if norm == "layer" else AddRMSNorm
        plain = LayerNorm if norm == "layer" else RMSNorm
        self.sublayers = torch.nn.ModuleList(sublayers)
        self.final_norm = final_norm
        count = len(sublayers) + (1 if final_norm else 0)
        # the first norm has no add in front of it; each later one takes the previous sublayer's residual
        self.norms = torch.nn.ModuleList(
            [plain(d_model, device=device, dtype=dtype, **norm_kwargs)]
            + [fused(d_model, device=device, dtype=dtype, **norm_kwargs) for _ in range(count - 1)])

    def forward(self, x):
        h, normed = x, self.norms[0](x)
        for i, sublayer in enumerate(self.sublayers):
            out = sublayer(normed)
            if i + 1 < len(self.norms):
                h, normed = self.norms[i + 1](h, out)
            else:
                h = h + out
        return normed if self.final_norm else h
