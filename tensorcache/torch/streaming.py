"""Layer streaming: run a model larger than the device, its blocks' weights fetched just in time.

``stream_layers(client, model, prefix, blocks, lookahead=N)`` takes a model
whose weights are a committed revision in the cluster (``put_state_dict``
or ``tensorcache load``). Each block (say ``model.layers[i]``) has its
parameters emptied at once; a forward pre-hook installs the block's weights
just before its forward and starts fetching the next ``lookahead`` blocks
(``Client.prefetch``: the fetch overlaps this block's compute); a forward
hook empties the block again after its forward. So at most
``lookahead + 1`` blocks' weights are resident at any moment (one
computing, ``lookahead`` arriving), whatever the model's depth. Fetches
wrap around: the last block prefetches the first blocks of the next
forward.

Everything outside the blocks (embeddings, the final norm, the head) is
loaded once and stays. Blocks must run in order, once per forward (a
decoder stack does).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from tensorcache.client.api import Client
from tensorcache.errors import InvalidArgument, Unavailable
from tensorcache.torch.revision import check_prefix, read_manifest, tensor_key


class LayerStreamer:
    """The hooks and their state; ``close()`` removes the hooks (see the module doc)."""

    def __init__(
        self,
        client: Client,
        model: Any,
        prefix: str,
        blocks: Sequence[Any],
        *,
        lookahead: int = 1,
        device: Any = None,
    ) -> None:
        import torch

        if lookahead < 0:
            raise InvalidArgument(f"lookahead must be >= 0, got {lookahead}")
        if not blocks:
            raise InvalidArgument("blocks must name at least one module")
        self.client = client
        self.prefix = check_prefix(prefix)
        self.lookahead = min(lookahead, len(blocks) - 1)
        self.device = device
        manifest = read_manifest(client, prefix)
        if manifest is None:
            raise InvalidArgument(f"revision {prefix!r} is not in the cluster (no manifest)")
        names = {id(m): n for n, m in model.named_modules()}
        self._blocks = list(blocks)
        self._params: list[dict[str, Any]] = []  # per block: full name -> Parameter/buffer
        in_blocks: set[str] = set()
        for b in self._blocks:
            if id(b) not in names:
                raise InvalidArgument("every block must be a submodule of model")
            base = names[id(b)]
            tensors = {
                f"{base}.{n}": t
                for n, t in [*b.named_parameters(recurse=True), *b.named_buffers(recurse=True)]
            }
            for n, t in tensors.items():
                rec = manifest.tensors.get(n)
                if rec is None or tuple(t.shape) != rec.shape:
                    raise InvalidArgument(
                        f"{n!r}: not in revision {prefix!r} with shape {tuple(t.shape)}"
                    )
            self._params.append(tensors)
            in_blocks |= set(tensors)
        # Everything else loads once and stays resident.
        with torch.no_grad():
            rest = {n: t for n, t in model.state_dict().items() if n not in in_blocks}
            got = client.get_many([tensor_key(prefix, n) for n in rest], as_="torch")
            for n, t in rest.items():
                v = got[tensor_key(prefix, n)]
                if v is None:
                    raise Unavailable(f"{tensor_key(prefix, n)!r} is missing from the cluster")
                t.copy_(v)
            for tensors in self._params:
                for t in tensors.values():
                    t.data = _empty(t)
        self._inflight: dict[int, Future[Any]] = {}
        self.resident: set[int] = set()  # blocks whose weights are installed
        self.max_resident = 0  # most blocks installed or in flight at once
        self.fetches = 0
        self._hooks = []
        for i, b in enumerate(self._blocks):
            self._hooks.append(b.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
            self._hooks.append(b.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i)))

    def _fetch(self, i: int) -> None:
        if i in self._inflight or i in self.resident:
            return
        keys = [tensor_key(self.prefix, n) for n in self._params[i]]
        self._inflight[i] = self.client.prefetch(keys, device=self.device, as_="torch")
        self.fetches += 1
        self._note()

    def _note(self) -> None:
        self.max_resident = max(self.max_resident, len(self.resident) + len(self._inflight))

    def _before(self, i: int) -> None:
        import torch

        self._fetch(i)  # the first block of the first forward, or lookahead 0
        got = self._inflight.pop(i).result()
        with torch.no_grad():
            for n, t in self._params[i].items():
                v = got[tensor_key(self.prefix, n)]
                if v is None:
                    raise Unavailable(f"{tensor_key(self.prefix, n)!r} is missing from the cluster")
                t.data = v
        self.resident.add(i)
        self._note()
        for j in range(1, self.lookahead + 1):
            self._fetch((i + j) % len(self._blocks))

    def _after(self, i: int) -> None:
        for t in self._params[i].values():
            t.data = _empty(t)
        self.resident.discard(i)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for f in self._inflight.values():
            f.cancel()
        self._inflight.clear()


def _empty(t: Any) -> Any:
    import torch

    return torch.empty(0, dtype=t.dtype, device=t.device)


def stream_layers(
    client: Client,
    model: Any,
    prefix: str,
    blocks: Sequence[Any],
    *,
    lookahead: int = 1,
    device: Any = None,
) -> LayerStreamer:
    """Stream ``blocks``' weights from revision ``prefix`` around their forwards."""
    return LayerStreamer(client, model, prefix, blocks, lookahead=lookahead, device=device)
