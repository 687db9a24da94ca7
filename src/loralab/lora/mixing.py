"""Each batch row with its own adapter: ``with mixed_adapters(model, ["sql", None, …]):``.

For the block, every LoRA layer gets a forward hook and runs the bare base (its active
adapter is set aside); the hook adds each row's own update to the base layer's output.
Nothing of it stays on the layers after the block. For ``Linear``/``Conv1D`` each row's
``A`` and scaled ``Bᵀ`` are gathered once, when the block is entered (the rows are fixed
inside it), so every forward — each decoding step of ``generate`` — is two batched matrix
products whatever the number of adapters, the second one accumulating straight into the
base output. Other layer types run one update per adapter present, on that adapter's rows.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import LoraExperts
from .inject import lora_layers, require_adapter, require_lora_factors
from .layers import LoraConv1D, LoraLayer, LoraLinear


class RowMix:
    """One layer's per-row factors for one mixed batch, and how to apply them."""

    def __init__(self, layer: LoraLayer, names: list[str | None], rows: Tensor):
        self.rows = rows  # each row's index into names
        self.names = names
        self.layer = layer
        self.batched = type(layer) in (LoraLinear, LoraConv1D)
        if self.batched:
            A, Bt = _cached_bank(layer, names)
            index = self.rows.to(A.device)
            self.A = A.index_select(0, index)  # (batch, r, in)
            self.Bt = Bt.index_select(0, index)  # (batch, r, out), scales folded in

    def __call__(self, x: Tensor, result: Tensor) -> Tensor:
        """``result`` (the base layer's output) plus each row's own update."""
        if x.shape[0] != self.rows.numel():
            raise ValueError(
                f"mixed_adapters was given {self.rows.numel()} row adapters but the batch "
                f"has {x.shape[0]} rows"
            )
        if self.batched:
            batch = x.shape[0]
            flat = x.to(self.A.dtype).reshape(batch, -1, x.shape[-1])  # (batch, tokens, in)
            hidden = torch.bmm(flat, self.A.transpose(1, 2))  # (batch, tokens, r)
            base = result.to(self.A.dtype).reshape(batch, -1, result.shape[-1])
            return torch.baddbmm(base, hidden, self.Bt).reshape(result.shape).to(result.dtype)
        rows = self.rows.to(x.device)
        out = result
        for index, name in enumerate(self.names):
            if name is None or name not in self.layer.lora:
                continue
            selected = (rows == index).nonzero().squeeze(1)
            if selected.numel() == 0:
                continue
            zero = result.new_zeros(selected.numel(), *result.shape[1:])
            update = self.layer.adapted(x[selected], zero, self.layer.lora[name])
            out = out.index_add(0, selected, update)
        return out


# One bank per layer: the stacked factors of the last mix of adapters it ran, with what
# they were built from. Kept beside the layers, not on them, and gone with the layer.
_BANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_bank(layer: LoraLayer, names: list[str | None]) -> tuple[Tensor, Tensor]:
    """``_bank``, rebuilt only when the adapters asked for or their weights changed.

    Stacking is most of the cost of entering a mixed batch (a few small copies per
    adapter and layer); a server mixes the same adapters again and again. The key holds
    each tensor's in-place version counter, which hot-swaps and optimizer steps bump,
    and the factors it was built from.
    """
    present = [layer.lora[n] for n in names if n is not None and n in layer.lora]
    versions = tuple((tuple(t._version for t in f.tensors().values()), f.scale) for f in present)
    # The factors themselves too: an adapter deleted and loaded again under its name has
    # new tensors whose version counters may read the same (a dead reference never
    # equals a live one).
    owners = tuple(weakref.ref(f) for f in present)
    key = (tuple(names), versions, owners)
    cached = _BANKS.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, _bank(layer, names))
        _BANKS[layer] = cached
    return cached[1]


def _bank(layer: LoraLayer, names: list[str | None]) -> tuple[Tensor, Tensor]:
    """Stacked A (n, r_max, in) and scaled Bᵀ (n, r_max, out); entry i is ``names[i]``.

    The bare base (None, or an adapter this layer lacks) is a zero entry; smaller ranks
    are zero-padded, which changes no product.
    """
    pairs = [layer.lora[n].low_rank() if n is not None and n in layer.lora else None for n in names]
    a_shape, b_shape = layer.factor_shapes(1)
    reference = layer.lora[next(iter(layer.lora))].A
    r_max = max((A.shape[0] for A, _ in filter(None, pairs)), default=1)
    zero_a = reference.new_zeros(r_max, a_shape[1])
    zero_bt = reference.new_zeros(r_max, b_shape[0])
    As, Bts = [], []
    for pair in pairs:
        if pair is None:
            As.append(zero_a)
            Bts.append(zero_bt)
        else:
            A, B = pair
            r = A.shape[0]
            As.append(F.pad(A.detach(), (0, 0, 0, r_max - r)))
            Bts.append(F.pad(B.detach().T, (0, 0, 0, r_max - r)))
    return torch.stack(As), torch.stack(Bts)


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row ``i`` of every batch runs adapter ``row_adapters[i]``.

    ``None`` runs the bare base for that row. Works for a forward pass and for
    ``model.generate`` (the rows keep their adapters at every step). Adapters must not be
    merged (a merged one is in every row's weights); this is for inference: no dropout.
    """
    rows = list(row_adapters)
    layers = lora_layers(model)  # once: walking the model per adapter costs more than a step
    for name in {r for r in rows if r is not None}:
        require_adapter(model, name)
        require_lora_factors(model, name, "mixed per row", layers)
    if any(layer.merged_adapters for layer in layers.values()):
        raise ValueError("unmerge the adapters first: a merged adapter would apply to every row")
    for module_name, layer in layers.items():
        for name in {r for r in rows if r is not None and r in layer.lora}:
            if isinstance(layer, LoraExperts):
                raise ValueError(
                    f"adapter {name!r} cannot be mixed per row: it adapts the stacked expert "
                    f"weights of {module_name!r}, whose tokens are routed apart from their "
                    "rows; merge it into the base, or run it alone"
                )
            if not layer.lora[name].is_product:
                raise ValueError(
                    f"adapter {name!r} cannot be mixed per row: its ΔW in {module_name!r} "
                    f"({type(layer.lora[name]).__name__}) is not a product of two factors"
                )
            if name in layer.rewrote:
                raise ValueError(
                    f"adapter {name!r} cannot be mixed per row: its init rewrote the base "
                    f"weight of {module_name!r}, which every other row would then use; save "
                    "it (converted to a plain LoRA) and load that"
                )
    names: list[str | None] = [None, *sorted({r for r in rows if r is not None})]
    index = {name: i for i, name in enumerate(names)}
    row_index = torch.tensor([index[r] for r in rows])
    mixes = {layer: RowMix(layer, names, row_index) for layer in layers.values()}
    active = {layer: layer.active_adapter for layer in layers.values()}
    handles = []
    try:
        for layer, mix in mixes.items():
            layer.active_adapter = None  # the layer runs the bare base; the hook adds the rows'
            # First among the layer's hooks, so that a user's own hooks see the mixed output.
            hook = _add_rows(mix)
            handles.append(layer.register_forward_hook(hook, prepend=True, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, name in active.items():
            layer.active_adapter = name


def _add_rows(mix: RowMix):
    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        x = args[0] if args else next(iter(kwargs.values()))  # the input, however passed
        return mix(x, output)

    return hook
