"""Why tlm refuses Muon under DeepSpeed ZeRO 1-3 rather than use DeepSpeed's own ZeRO Muon: on the same gradient,
DeepSpeed's update (`deepspeed.runtime.zero.muon.original_muon.muon_update`, both its Newton-Schulz methods) against
torch's (`torch.optim.Muon`'s momentum, Nesterov, Newton-Schulz and "original" shape adjustment), on the CPU-scale
study's matrix shapes. Prints, per shape and method, the largest difference over the largest element of torch's
update and the ratio of their RMS.

    python scripts/deepspeed_muon_update.py
"""

from __future__ import annotations

import torch
from deepspeed.runtime.zero.muon.original_muon import muon_update
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

MOMENTUM = 0.95
COEFFICIENTS = (3.4445, -4.775, 2.0315)


def torch_update(grad: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's first step on `grad`, divided by the learning rate (its shape adjustment included)."""
    buffer = torch.zeros_like(grad).lerp_(grad, 1 - MOMENTUM)
    update = _zeropower_via_newtonschulz(grad.lerp(buffer, MOMENTUM), COEFFICIENTS, 5, 1e-7).float()
    return update * _adjust_lr(1.0, "original", grad.shape)


def main() -> None:
    torch.manual_seed(0)
    for shape in [(128, 128), (512, 128), (128, 512)]:
        grad = torch.randn(shape) * 1e-2
        reference = torch_update(grad)
        for method in ("gram", "standard"):
            theirs = muon_update(grad.clone(), torch.zeros(shape), MOMENTUM, ns_method=method).float()
            apart = float((theirs - reference).abs().max() / reference.abs().max())
            rms = float(theirs.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())
            print(f"{shape[0]}x{shape[1]} {method:8s}: max |DeepSpeed - torch| / max |torch| = {apart:.3f}, "
                  f"RMS ratio {rms:.4f}")


if __name__ == "__main__":
    main()
