"""Per-prompt routing carried through a host's batching: which layer contexts and which task weights every row of
every attention call gets.

Transport (ComfyUI, `nodes/host/attention.py`; measured on v0.3.75, see `comfy/sampler_helpers.py:convert_cond` and
`comfy/samplers.py:_calc_cond_batch`):

- A CIDM prompt is an ordinary conditioning: a [1, T, D] tensor (T = 77) that any model samples sensibly from
  (`ordinary_context`), so the host batches it with any negative as it batches stock prompts. The layer-wise
  contexts and the concept tokens the prompt names ride beside it, in the cond's dict under `PROMPT_KEY`, as a
  `LayerwisePrompt`. The host copies that dict into every cond it derives (area, mask, timestep range) and gives
  each cond a uuid.
- Once per sampling run, a wrapper around the sampler reads the guider's conds and builds one `SamplingRoutes`:
  per cond uuid, its `LayerwisePrompt` (or None for a stock prompt) and, per adapter (one per LoRA library patch),
  its task weights [L, K] (`route_conds`: the named/elastic/one-hot/fixed router, times each task's multiplier).
- Every model call carries that object in `transformer_options[ROUTES_KEY]`, next to the host's
  `transformer_options["uuids"]`: one uuid per chunk of the batch, the chunks being equal slices of the batch
  rows, in the order of `cond_or_uncond`.

Reuse (e.g. region-aware cross-attention): inside any attention call with `transformer_options` `to`,

    routes = to[ROUTES_KEY]; uuids = to["uuids"]
    routes.prompt(uuid)                        -> LayerwisePrompt | None (layer contexts [L, T, D], named tokens)
    routes.layer_context(l, uuids, context)    -> the batch's context for layer l, CIDM chunks replaced
    routes.row_weights(adapter, l, uuids, B)   -> [B, K] task weights per row (0 = that task is not computed)
    routes.cached(key, make)                   -> a value made once per sampling run (device copies, RunCache)

Unconditional rows ("match cond", the official CIDM code's policy, JiahuaDong/CIFC@9819aa8
`lib/models/edlora.py`): every cond under the guider's "negative" key gets, per task and layer, the largest weight
any whole-canvas cond of the same run gives that task, so classifier-free guidance sees the prompt difference and
not a LoRA difference, however the host batches or splits cond and uncond. A spatial cond (a region's prompt, a host
cond with an area or a mask) is never paired: the negative covers the whole canvas, so a concept paired from a
region's prompt would act on every image token (the region leak of issue 29: a region naming `<cat>` under a global
prompt naming none moved the latent by up to 190 through the negative alone). Inside a region, region-aware
attention gives the negative's rows the region's concepts itself (cidm/regions.py, `RegionPlan`). "own" routes
every cond from its own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Protocol

import torch

from .errors import CIDMInputError

PROMPT_KEY = "cidm_prompt"
ROUTES_KEY = "cidm_routes"
UNCOND_POLICIES = ("match cond", "own")
NEGATIVE = "negative"
REGION_PREFIX = "region_"  # guider keys of region prompts: the Context-Controlled guider's region_<index>


@dataclass(frozen=True)
class NamedConcept:
    """A library concept a prompt names: its name, its tokens in the prompt, and their positions in the prompt's
    context (indices into its T tokens, over every 77-token chunk), where cross-attention reads them
    (cidm.auto_regions)."""

    name: str
    tokens: tuple[str, ...]
    positions: tuple[int, ...]


@dataclass(frozen=True)
class LayerwisePrompt:
    """What a CIDM prompt carries beside its ordinary tensor.

    contexts: [L, T, D] float32 layer contexts, or None when every layer would see the same context (the prompt
    names no concept), so the ordinary tensor is used unchanged. tokens: the concept tokens the prompt names.
    concepts: the concepts they belong to, with their positions (empty for a prompt encoded before they were
    recorded)."""

    contexts: torch.Tensor | None
    tokens: tuple[str, ...]
    library: str
    concepts: tuple[NamedConcept, ...] = ()

    @property
    def num_layers(self) -> int | None:
        return None if self.contexts is None else self.contexts.shape[0]


def only_concept(prompt: LayerwisePrompt, concept: NamedConcept) -> LayerwisePrompt:
    """The same prompt (the same layer contexts) naming `concept` only: `named` routing then applies that concept's
    tasks alone (an automatic region's prompt, cidm.auto_regions)."""
    return replace(prompt, tokens=concept.tokens, concepts=(concept,))


def ordinary_context(contexts: torch.Tensor) -> torch.Tensor:
    """[1, T, D] for layer contexts [L, T, D]: their mean, which a model without the patch attends to."""
    return contexts.mean(dim=0, keepdim=True)


class CondRouter(Protocol):
    """Task weights [L, K] of one cond, from its LayerwisePrompt (None for a stock prompt) and its ordinary context
    [T, D]."""

    def route(self, prompt: LayerwisePrompt | None, context: torch.Tensor, num_layers: int) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class CondEntry:
    """One cond of a sampling run as the guider holds it: its uuid, the guider's key ("positive", "negative", ...),
    its LayerwisePrompt (or None), its ordinary context [1, T, D] (or None), and whether it acts on part of the
    canvas only (`spatial`: a region's prompt, or a cond with an area or a mask), which "match cond" never pairs
    the negative with."""

    uuid: Hashable
    kind: str
    prompt: LayerwisePrompt | None
    context: torch.Tensor | None
    spatial: bool = False


def route_conds(router: CondRouter, conds: list[CondEntry], multipliers: torch.Tensor, num_layers: int,
                uncond: str = "match cond") -> dict[Hashable, torch.Tensor]:
    """uuid -> [L, K] weights (router weight × task multiplier) for every cond of one sampling run; under
    "match cond" a negative gets the largest weights of the whole-canvas (not `spatial`) conds that are not
    negatives, and zeros when there is none (module docstring).

    Raises:
        CIDMInputError: ("uncond_weights") for an unknown policy; ("conditioning") for a prompt encoded for another
            layer count than `num_layers`.
    """
    if uncond not in UNCOND_POLICIES:
        raise CIDMInputError("uncond_weights", f"unknown policy {uncond!r}; supported: {', '.join(UNCOND_POLICIES)}")
    for entry in conds:
        if entry.prompt is not None and entry.prompt.num_layers not in (None, num_layers):
            raise CIDMInputError("conditioning", f"the prompt was encoded for {entry.prompt.num_layers} layers, the "
                                                 f"model has {num_layers}; encode it with this model's library")
    table = {}
    for entry in conds:
        context = entry.context[0].float() if entry.context is not None else None
        table[entry.uuid] = router.route(entry.prompt, context, num_layers) * multipliers
    if uncond == "match cond":
        positives = [table[e.uuid] for e in conds if e.kind != NEGATIVE and not e.spatial]
        paired = torch.stack(positives).amax(dim=0) if positives else None
        for entry in conds:
            if entry.kind == NEGATIVE:
                table[entry.uuid] = torch.zeros_like(table[entry.uuid]) if paired is None else paired
    return table


class RunCache:
    """Values made once per sampling run and then reused by every step: device copies of host tensors and prepared
    attention inputs. On a GPU, a host-to-device copy or a read-back inside a step waits for the launch queue to
    drain, in every layer (benchmarks/results/gpu-h200.md).

    `static_weights`: the host keeps the model's weights fixed for the whole run, so values computed from them
    (LoRA folded into a projection's weight, projected keys and values of a constant context) may be cached too.
    A host that changes weights inside a run (ComfyUI's weight hooks, whose keyframes re-patch weights in place)
    sets it False."""

    static_weights = True

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value made by `make()` the first time `key` was asked for."""
        made = self.__dict__.setdefault("_made", {})
        if key not in made:
            made[key] = make()
        return made[key]

    def forget(self) -> None:
        """Drops every cached value (and the device memory it holds): for an owner that outlives a sampling run."""
        self.__dict__.pop("_made", None)


@dataclass
class SamplingRoutes(RunCache):
    """One sampling run's routing, reachable from every attention call (see the module docstring)."""

    prompts: dict[Hashable, LayerwisePrompt | None] = field(default_factory=dict)
    weights: dict[Hashable, dict[Hashable, torch.Tensor]] = field(default_factory=dict)  # adapter -> uuid -> [L, K]

    def add_conds(self, conds: list[CondEntry]) -> None:
        self.prompts.update({entry.uuid: entry.prompt for entry in conds})

    def prompt(self, uuid: Hashable) -> LayerwisePrompt | None:
        return self.prompts.get(uuid)

    def _known(self, uuids: list) -> None:
        unknown = [u for u in uuids if u not in self.prompts]
        if unknown:
            raise CIDMInputError("conditioning", "a cond reached the model that the sampler did not hold when "
                                                 "sampling started; CIDM cannot route it")

    def layer_context(self, layer: int, uuids: list, context: torch.Tensor) -> torch.Tensor:
        """The batch context [B, T, D] for layer `layer`: chunks of CIDM prompts get that layer's context, repeated
        along the tokens to T (attention over identical copies is the same attention); other chunks are untouched,
        so a stock negative is seen whole by every layer.

        Raises:
            CIDMInputError: ("conditioning") for a cond the run did not register, or a batch context whose length
                is not a multiple of the layer context's.
        """
        self._known(uuids)
        prompts = [self.prompts[u] for u in uuids]
        if all(p is None or p.contexts is None for p in prompts):
            return context
        chunks = list(context.chunk(len(uuids)))
        for index, (uuid, prompt) in enumerate(zip(uuids, prompts)):
            if prompt is None or prompt.contexts is None:
                continue
            own = self.cached(("layer context", uuid, layer, context.shape[1], context.device, context.dtype),
                              lambda: self._repeated(prompt.contexts[layer], context))
            chunks[index] = own.expand(chunks[index].shape[0], -1, -1)
        return torch.cat(chunks)

    @staticmethod
    def _repeated(own: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """A layer context [T', D] repeated along the tokens to the batch context's length T, on its device."""
        repeats, remainder = divmod(context.shape[1], own.shape[0])
        if remainder:
            raise CIDMInputError("conditioning", f"a batch context of {context.shape[1]} tokens cannot hold a "
                                                 f"{own.shape[0]}-token layer context")
        return own.to(context).repeat(repeats, 1)

    def row_weights(self, adapter: Hashable, layer: int, uuids: list, batch: int) -> torch.Tensor:
        """[batch, K] task weights of layer `layer`, one row per batch row (chunks are equal slices)."""
        self._known(uuids)
        per_cond = self.weights[adapter]
        rows = torch.stack([per_cond[u][layer] for u in uuids])  # [chunks, K]
        return rows.repeat_interleave(batch // len(uuids), dim=0)
