"""Named weight-initialization schemes: the first of the notes' "critical aspects of NN training".

``initialize(model, {"name": "kaiming_normal"})`` re-initializes every Linear layer of a
:class:`manualbp.MLP` (or of an ``nn.Sequential`` of Linear and activation modules) in place.
Where ``torch.nn.init`` has the scheme it is called directly, so the distribution is PyTorch's own:

==================  ===============================================  ====================
name                weight distribution (fan_in = in_features)       parameters
==================  ===============================================  ====================
zeros               0                                                -
constant            value                                            value
normal              N(mean, std^2)                                   std (0.01), mean (0)
uniform             U(-a, a)                                         a (0.05)
xavier_uniform      U(-g sqrt(6/(fan_in+fan_out)), +...)             gain (1.0 or "auto")
xavier_normal       N(0, g^2 2/(fan_in+fan_out))                     gain (1.0 or "auto")
kaiming_uniform     U(-g sqrt(3/fan), +...), g from the nonlinearity mode (fan_in), gain
kaiming_normal      N(0, g^2/fan), g from the nonlinearity           mode (fan_in), gain
lecun_uniform       U(-sqrt(3/fan_in), +...)                         -
lecun_normal        N(0, 1/fan_in)                                   -
orthogonal          a (semi-)orthogonal matrix times gain            gain (1.0 or "auto")
torch_default       what nn.Linear.reset_parameters does             -
==================  ===============================================  ====================

"Gain from the nonlinearity" means ``torch.nn.init.calculate_gain`` of the activation that follows the
layer (the output layer counts as "linear"; leaky_relu uses the model's negative slope). For the
kaiming schemes that is the default; for xavier and orthogonal ``gain: auto`` asks for it (their default
gain is 1, as in PyTorch).

Biases are initialized separately by ``bias`` (a name or a mapping with a name and its parameters):
zeros by default, any scheme that makes sense for a vector (zeros, constant, normal, uniform), or
``torch_default`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's bias). With ``name: torch_default``
the bias defaults to ``torch_default`` too, so the whole layer is what ``nn.Linear`` would give.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .registry import ACTIVATION_REGISTRY

__all__ = ["SCHEMES", "BIAS_SCHEMES", "initialize", "init_weight", "init_bias", "layer_nonlinearities"]


def _gain(params: Mapping[str, Any], nonlinearity: str, slope: float, default: Union[float, str]) -> float:
    gain = params.get("gain", default)
    if gain == "auto":  # the registry's gain of the activation (torch's calculate_gain for the built-in ones)
        if nonlinearity in ACTIVATION_REGISTRY:
            return ACTIVATION_REGISTRY[nonlinearity].gain(slope)
        return nn.init.calculate_gain(nonlinearity)
    return float(gain)


def _zeros(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.zeros_(w)


def _constant(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.constant_(w, float(p.get("value", 0.0)))


def _normal(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.normal_(w, mean=float(p.get("mean", 0.0)), std=float(p.get("std", 0.01)), generator=g)


def _uniform(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    a = float(p.get("a", 0.05))
    nn.init.uniform_(w, -a, a, generator=g)


def _xavier_uniform(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.xavier_uniform_(w, gain=_gain(p, nl, slope, 1.0), generator=g)


def _xavier_normal(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.xavier_normal_(w, gain=_gain(p, nl, slope, 1.0), generator=g)


def _kaiming_std(w: Tensor, p: Mapping[str, Any], nl: str, slope: float) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    fan = fan_in if p.get("mode", "fan_in") == "fan_in" else fan_out
    return _gain(p, nl, slope, "auto") / math.sqrt(fan)


def _kaiming_uniform(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    if "gain" not in p and nl in ("relu", "leaky_relu", "linear", "sigmoid", "tanh"):
        # PyTorch's own function, with the layer's nonlinearity: the very same draw.
        a = slope if nl == "leaky_relu" else 0.0
        nn.init.kaiming_uniform_(w, a=a, mode=p.get("mode", "fan_in"), nonlinearity=nl, generator=g)
        return
    bound = math.sqrt(3.0) * _kaiming_std(w, p, nl, slope)
    nn.init.uniform_(w, -bound, bound, generator=g)


def _kaiming_normal(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    if "gain" not in p and nl in ("relu", "leaky_relu", "linear", "sigmoid", "tanh"):
        a = slope if nl == "leaky_relu" else 0.0
        nn.init.kaiming_normal_(w, a=a, mode=p.get("mode", "fan_in"), nonlinearity=nl, generator=g)
        return
    nn.init.normal_(w, 0.0, _kaiming_std(w, p, nl, slope), generator=g)


def _lecun_uniform(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    # LeCun et al. (1998): variance 1/fan_in; kaiming with the "linear" gain of 1 is exactly that.
    nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="linear", generator=g)


def _lecun_normal(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="linear", generator=g)


def _orthogonal(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.orthogonal_(w, gain=_gain(p, nl, slope, 1.0), generator=g)


def _torch_default(w: Tensor, p: Mapping[str, Any], nl: str, slope: float, g: Optional[torch.Generator]) -> None:
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)  # nn.Linear.reset_parameters


SchemeFn = Callable[[Tensor, Mapping[str, Any], str, float, Optional[torch.Generator]], None]

#: name -> function(weight, params, nonlinearity, negative_slope, generator) filling ``weight`` in place.
SCHEMES: dict[str, SchemeFn] = {
    "zeros": _zeros,
    "constant": _constant,
    "normal": _normal,
    "uniform": _uniform,
    "xavier_uniform": _xavier_uniform,
    "xavier_normal": _xavier_normal,
    "kaiming_uniform": _kaiming_uniform,
    "kaiming_normal": _kaiming_normal,
    "lecun_uniform": _lecun_uniform,
    "lecun_normal": _lecun_normal,
    "orthogonal": _orthogonal,
    "torch_default": _torch_default,
}

#: the parameters each scheme accepts (besides ``name`` and ``bias``).
SCHEME_PARAMS: dict[str, tuple[str, ...]] = {
    "zeros": (),
    "constant": ("value",),
    "normal": ("std", "mean"),
    "uniform": ("a",),
    "xavier_uniform": ("gain",),
    "xavier_normal": ("gain",),
    "kaiming_uniform": ("mode", "gain"),
    "kaiming_normal": ("mode", "gain"),
    "lecun_uniform": (),
    "lecun_normal": (),
    "orthogonal": ("gain",),
    "torch_default": (),
}


def _bias_torch_default(b: Tensor, p: Mapping[str, Any], fan_in: int, g: Optional[torch.Generator]) -> None:
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(b, -bound, bound, generator=g)


#: bias schemes: name -> function(bias, params, fan_in, generator).
BIAS_SCHEMES: dict[str, Callable[[Tensor, Mapping[str, Any], int, Optional[torch.Generator]], None]] = {
    "zeros": lambda b, p, fan_in, g: _zeros(b, p, "linear", 0.0, g),
    "constant": lambda b, p, fan_in, g: _constant(b, p, "linear", 0.0, g),
    "normal": lambda b, p, fan_in, g: _normal(b, p, "linear", 0.0, g),
    "uniform": lambda b, p, fan_in, g: _uniform(b, p, "linear", 0.0, g),
    "torch_default": _bias_torch_default,
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_params(name: str, params: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key, value in params.items():
        if key not in allowed:
            hint = f"; {name} takes {', '.join(allowed)}" if allowed else f"; {name} takes no parameters"
            raise ValueError(f"{where}.{key} is not a parameter of init scheme {name!r}{hint}")
        if key == "mode":
            if value not in ("fan_in", "fan_out"):
                raise ValueError(f"{where}.mode must be 'fan_in' or 'fan_out', got {value!r}")
        elif key == "gain":
            if value != "auto" and not (_is_number(value) and value > 0):
                raise ValueError(f"{where}.gain must be a positive number or 'auto', got {value!r}")
        elif key in ("std", "a"):
            if not (_is_number(value) and value >= 0):
                raise ValueError(f"{where}.{key} must be a number >= 0, got {value!r}")
        elif not _is_number(value):
            raise ValueError(f"{where}.{key} must be a finite number, got {value!r}")


def _split_cfg(cfg: object, where: str, names: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{where} must be a scheme name or a mapping with a 'name', got {type(cfg).__name__}")
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in names:
        raise ValueError(f"{where}.name must be one of {', '.join(names)}, got {name!r}")
    return name, cfg


def check_init_cfg(init_cfg: object, where: str = "init") -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    """Validate an init config; returns (weight scheme, its params, bias scheme, its params)."""
    name, params = _split_cfg(init_cfg, where, SCHEMES)
    bias_cfg = params.pop("bias", None)
    _check_params(name, params, SCHEME_PARAMS[name], where)
    if bias_cfg is None:
        bias_cfg = "torch_default" if name == "torch_default" else "zeros"
    bias_name, bias_params = _split_cfg(bias_cfg, f"{where}.bias", BIAS_SCHEMES)
    _check_params(bias_name, bias_params, SCHEME_PARAMS[bias_name], f"{where}.bias")
    return name, params, bias_name, bias_params


def layer_nonlinearities(model: nn.Module) -> list[tuple[nn.Linear, str, float]]:
    """(linear layer, the nonlinearity after it, its negative slope) for each layer, input to output."""
    from .nn import MLP, _Activation

    if isinstance(model, MLP):
        specs = list(model.activation_specs) + [("linear", 0.0)]
        names = [("linear" if n == "identity" else n, s) for n, s in specs]
        return [(lin, n, s) for lin, (n, s) in zip(model.linears, names)]
    if isinstance(model, nn.Sequential):
        mods = list(model)
        out = []
        for k, m in enumerate(mods):
            if isinstance(m, nn.Linear) or type(m).__name__ == "Linear" and hasattr(m, "weight"):
                nxt = mods[k + 1] if k + 1 < len(mods) else None
                nl, slope = "linear", 0.0
                if isinstance(nxt, _Activation):
                    nl, slope = nxt.spec
                elif isinstance(nxt, nn.LeakyReLU):
                    nl, slope = "leaky_relu", nxt.negative_slope
                elif isinstance(nxt, (nn.Sigmoid, nn.Tanh, nn.ReLU)):
                    nl = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu"}[type(nxt)]
                out.append((m, "linear" if nl == "identity" else nl, float(slope)))
        if not out:
            raise ValueError("model: the nn.Sequential holds no Linear layer to initialize")
        return out
    raise TypeError(f"model must be a manualbp.MLP or an nn.Sequential, got {type(model).__name__}")


def init_weight(
    weight: Tensor,
    init_cfg: object,
    nonlinearity: str = "linear",
    negative_slope: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Fill one (out, in) weight in place with the scheme of ``init_cfg``; returns it."""
    name, params, _, _ = check_init_cfg(init_cfg)
    with torch.no_grad():
        _draw(lambda t: SCHEMES[name](t, params, nonlinearity, negative_slope, generator), weight)
    return weight


def init_bias(bias: Tensor, init_cfg: object, fan_in: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fill one bias vector in place with ``init_cfg``'s bias scheme; returns it."""
    _, _, name, params = check_init_cfg(init_cfg)
    with torch.no_grad():
        _draw(lambda t: BIAS_SCHEMES[name](t, params, fan_in, generator), bias)
    return bias


def _draw(fill: Callable[[Tensor], None], tensor: Tensor) -> None:
    """Run ``fill`` on ``tensor``; half-precision tensors are drawn in float32 and rounded (some schemes,
    e.g. orthogonal's QR, have no half-precision kernel)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tmp = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
        fill(tmp)
        tensor.copy_(tmp)
    else:
        fill(tensor)


def initialize(model: nn.Module, init_cfg: object, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Re-initialize every Linear layer of ``model`` in place with the scheme ``init_cfg`` names.

    Args:
        model: a :class:`manualbp.MLP` or an ``nn.Sequential`` of Linear and activation modules.
        init_cfg: a scheme name, or a mapping ``{"name": ..., <scheme parameters>, "bias": ...}``.
        generator: a ``torch.Generator`` for reproducible draws (on the parameters' device); None uses
            the global RNG.

    Returns:
        ``model``.

    Example:
        >>> model = manualbp.MLP(64, [64], 10)
        >>> initialize(model, {"name": "normal", "std": 0.01}, torch.Generator().manual_seed(0))
    """
    name, params, bias_name, bias_params = check_init_cfg(init_cfg)
    with torch.no_grad():
        for lin, nl, slope in layer_nonlinearities(model):
            _draw(lambda t, nl=nl, slope=slope: SCHEMES[name](t, params, nl, slope, generator), lin.weight)
            if lin.bias is not None:
                fan_in = lin.weight.shape[1]
                _draw(lambda t, f=fan_in: BIAS_SCHEMES[bias_name](t, bias_params, f, generator), lin.bias)
    return model
