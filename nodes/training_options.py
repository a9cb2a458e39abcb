"""The method hyperparameters of Train Concept Increment, produced by the Concept Training Options node.

Train Concept Increment keeps on its face only what a user must choose (model, clip, vae, library, images or folder,
concept, method, steps); everything else arrives through its optional `options` input, the way SamplerCustom takes
its sampler and sigmas from other nodes. `TrainingOptions()` is the single source of the defaults: the options
node's widgets default to these fields, and a Train Concept Increment without options uses them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from ..cidm.consolidation import ConsolidationWeights
from ..cidm.family import FAMILIES, TOKEN_SLOT_RULES
from ..cidm.train import TrainingConfig

TrainingOptionsType = io.Custom("CIDM_TRAINING_OPTIONS")


@dataclass(frozen=True)
class TrainingOptions:
    """Everything Train Concept Increment needs besides its own inputs. The method's defaults are cidm's own
    (`TrainingConfig`, `ConsolidationWeights`: the released CIDM configs for SD1.5, JiahuaDong/CIFC
    `options/train/*.yml`), on every family: CIDM's SDXL settings were never released (JiahuaDong/CIFC README,
    TODO). Resolution 0 trains at the model family's native size (`cidm.family.ModelFamily.resolution`: SD1.5 512
    px, as those configs; SDXL 1024 px, its native size, the default of ComfyUI's CLIPTextEncodeSDXL,
    comfy_extras/nodes_clip_sdxl.py:34-39, v0.3.75). The node saves a resumable state every 100 steps."""
    tokens: str = ""
    class_words: str = ""
    template: str = TrainingConfig.template
    lora_lr: float = TrainingConfig.lora_lr
    embedding_lr: float = TrainingConfig.embedding_lr
    rank: int = TrainingConfig.rank
    multiplier: float = TrainingConfig.multiplier
    orthogonal_weight: float = ConsolidationWeights.orthogonal
    shared_weight: float = ConsolidationWeights.shared
    clora_lambda: float = ConsolidationWeights.clora
    resolution: int = 0  # the model family's native size
    batch_size: int = TrainingConfig.batch_size
    training_seed: int = TrainingConfig.seed
    save_every: int = 100
    resume: bool = True
    gradient_checkpointing: bool = TrainingConfig.gradient_checkpointing
    preview_every: int = 0
    token_slots: str = "family default"

    def config(self, method: str, steps: int) -> TrainingConfig:
        return TrainingConfig(
            steps=steps, method=method, rank=self.rank, multiplier=self.multiplier, lora_lr=self.lora_lr,
            embedding_lr=self.embedding_lr, batch_size=self.batch_size, template=self.template,
            seed=self.training_seed, save_every=self.save_every, gradient_checkpointing=self.gradient_checkpointing,
            consolidation=ConsolidationWeights(orthogonal=self.orthogonal_weight, shared=self.shared_weight,
                                               clora=self.clora_lambda))


DEFAULTS = TrainingOptions()


def _inputs() -> list:
    d = DEFAULTS
    return [
        io.String.Input("tokens", default=d.tokens, tooltip="Concept tokens, e.g. '<dog1> <dog2>'. Empty: two "
                        "tokens <name#1> <name#2> from the concept name ('#' keeps them apart from concept "
                        "names)."),
        io.String.Input("class_words", default=d.class_words, tooltip="Words that initialise tokens 2.. (token 1 "
                        "starts random), e.g. 'teddy bear' for three tokens. Empty: all tokens start random. Ignored by "
                        "c-lora, whose tokens all start random."),
        io.Combo.Input("template", options=["object", "style"], default=d.template,
                       tooltip="Caption templates for images without a .txt caption: objects ('a photo of a "
                               "...') or styles ('a painting in the style of ...')."),
        io.Float.Input("lora_lr", default=d.lora_lr, min=0.0, max=1.0, step=1e-5,
                       tooltip="Learning rate of the LoRA factors (AdamW)."),
        io.Float.Input("embedding_lr", default=d.embedding_lr, min=0.0, max=1.0, step=1e-4,
                       tooltip="Learning rate of the layer-wise token embeddings (AdamW)."),
        io.Int.Input("rank", default=d.rank, min=1, max=128,
                     tooltip="LoRA rank r of every attn2 projection; the task file grows linearly with it."),
        io.Float.Input("multiplier", default=d.multiplier, min=0.0, max=16.0, step=0.05,
                       tooltip="LoRA multiplier: h = Wx + multiplier·BAx. Stored with the task; aggregation and "
                               "export apply it too."),
        io.Float.Input("orthogonal_weight", default=d.orthogonal_weight, min=0.0, max=100.0, step=0.01,
                       tooltip="cidm: weight of the task-specific orthogonality to the old tasks' LoRAs. Under "
                               "`named` routing (the default) it adds nothing measured: each prompt applies only "
                               "the concepts it names (toy world, issue #33: both terms at 0 gave 0.96 against "
                               "0.94 final accuracy, retention 1.00 either way). It matters only where tasks are "
                               "summed or mixed."),
        io.Float.Input("shared_weight", default=d.shared_weight, min=0.0, max=100.0, step=0.001,
                       tooltip="cidm: weight of the pull toward the task-shared basis. Like the "
                               "orthogonality term, nothing measured under `named` routing (issue #33)."),
        io.Float.Input("clora_lambda", default=d.clora_lambda, min=0.0, max=1.0e6, step=0.01,
                       tooltip="c-lora: overlap penalty weight (Smith et al.), normalised by the old updates' "
                               "size, so the same value works at any learning rate (trains only attn2 key/value; "
                               "tokens start random; keep the class word out of captions)."),
        io.Int.Input("resolution", default=d.resolution, min=0, max=2048, step=8,
                     tooltip="Training images are scaled (short side) and centre-cropped to this square size, "
                             "in pixels (a multiple of 8, at least 64). 0: the model family's native size, "
                             "SD1.5 512 and SDXL 1024."),
        io.Int.Input("batch_size", default=d.batch_size, min=1, max=64, tooltip="Images per optimizer step."),
        # Not named `seed`: the frontend gives inputs named seed a "randomize after every run" control, and a
        # training seed that changes each run would retrain a different concept.
        io.Int.Input("training_seed", default=d.training_seed, min=0, max=2**31 - 1, control_after_generate=False,
                     tooltip="Seed of the noise, timesteps and token init; fixed, so a run can be repeated."),
        io.Int.Input("save_every", default=d.save_every, min=0, max=100000,
                     tooltip="Save a resumable state every N steps (0: never)."),
        io.Boolean.Input("resume", default=d.resume, tooltip="Continue from the saved state of this concept if "
                         "an interrupted run left one."),
        io.Boolean.Input("gradient_checkpointing", default=d.gradient_checkpointing,
                         tooltip="Recompute activations in the backward pass: less memory, more time."),
        io.Int.Input("preview_every", default=d.preview_every, min=0, max=100000,
                     tooltip="Every N steps, sample the concept with the weights so far and show it on the node "
                             "(0: never). Each preview costs about 24 model passes."),
        io.Combo.Input("token_slots", options=list(TOKEN_SLOT_RULES), default=d.token_slots,
                       tooltip="How many embeddings each concept token has: one per cross-attention layer, or one "
                               "per transformer stack (SDXL: 11 instead of 70, about 6x fewer text-encoder passes "
                               "per training step). A new library records its choice; later concepts use it. "
                               "Family default: " + ", ".join(
                                   f"{family.name} {'per transformer stack' if family.shared_slots else 'per layer'}"
                                   for family in FAMILIES) + "."),
    ]


class ConceptTrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ConceptTrainingOptions", display_name="Concept Training Options", category="CIDM/library",
            description="The method's hyperparameters for Train Concept Increment (its optional options input). "
                        "Without this node the defaults shown here apply.",
            inputs=_inputs(),
            outputs=[TrainingOptionsType.Output(display_name="options",
                                                tooltip="Connect to Train Concept Increment's options input.")])

    @classmethod
    def execute(cls, **values):
        return io.NodeOutput(TrainingOptions(**values))

