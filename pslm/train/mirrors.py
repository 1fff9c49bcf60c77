"""The tensors the parameter servers read and write for a worker's model.

    mirrors = HostMirrors.attach(client, params, values, device)  # after client.init
    client.push_pull(mirrors.grads(), mirrors.host, clock=step)
    mirrors.load()                        # the pulled values into the model

The PS speaks CPU tensors laid out for the wire (``client.allocate``). On a CPU worker the
model computes in them directly - its parameters and gradient buffers are those tensors - and
every copy here is a no-op. On a GPU they are pinned CPU mirrors: gradients are copied out
before each push and the parameters copied in after each pull.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pslm.ps.client.client import PSClient


class HostMirrors:
    """The wire-layout CPU tensors of one model's parameters (``host``) and gradients."""

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        host: dict[str, torch.Tensor],
        host_grads: dict[str, torch.Tensor] | None,
        device: torch.device,
    ):
        self.params = params
        self.host = host
        """Where pulls bring the parameters (on a CPU worker: the parameters themselves)."""
        self.host_grads = host_grads
        """On a GPU: where gradients are copied before a push; None on a CPU worker."""
        self.device = device

    @classmethod
    def attach(
        cls,
        client: PSClient,
        params: Mapping[str, torch.Tensor],
        values: Mapping[str, torch.Tensor],
        device: torch.device,
    ) -> HostMirrors:
        """Allocate the wire's tensors, fill them and the model with ``values`` (CPU tensors),
        and on a CPU worker make them the model's parameters and gradient buffers."""
        on_gpu = device.type != "cpu"
        host = client.allocate(pin_memory=on_gpu)
        grads = client.allocate(pin_memory=on_gpu)
        with torch.no_grad():
            for n, p in params.items():
                host[n].copy_(values[n])
                if on_gpu:
                    p.copy_(host[n])
                else:
                    # The model computes in the wire layout itself: no copies.
                    p.data = host[n]
                    p.grad = grads[n]
        return cls(params, host, grads if on_gpu else None, device)

    def grads(self) -> dict[str, torch.Tensor]:
        """The model's gradients as the wire takes them (on a GPU: copied to the mirrors)."""
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        if self.host_grads is None:
            return grads
        for n, g in grads.items():
            self.host_grads[n].copy_(g, non_blocking=True)
        torch.cuda.synchronize(self.device)
        return self.host_grads

    def load(self) -> None:
        """Put the pulled parameters into the model (on a GPU; on a CPU they are there)."""
        if self.device.type != "cpu":
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.host[n], non_blocking=True)
