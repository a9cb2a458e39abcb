"""The same cidm training and aggregation code on a tiny diffusers UNet and CLIP text encoder (the toy-world
path): two tasks in sequence, eps and v-prediction, and elastic aggregation through the attention processors."""

import random
from unittest import mock

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models import attention_processor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cidm.adapters import LayerLoRABank
from cidm.aggregation import RowRouter, make_router
from cidm.backends.diffusers_backend import DiffusersDenoiser, DiffusersLayerwiseEncoder, RegionBatch
from cidm.consolidation import ConsolidationWeights
from cidm.data import ImageSize, TrainingSet
from cidm.errors import CIDMInputError
from cidm.layers import PROJECTIONS
from cidm.train import ConceptSpec, ConceptTrainer, PooledConditioning, TrainingCallbacks, TrainingConfig
from comfy_host import COMFY_ROOT

TOKENIZER = COMFY_ROOT / "comfy" / "sd1_tokenizer"  # files only: ComfyUI is never imported here
WIDTH = 32
TOKENS = 16


@pytest.fixture(scope="module")
def tiny_world():
    if not TOKENIZER.is_dir():
        pytest.skip("the ComfyUI host (for its CLIP tokenizer files) is not installed")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=TOKENS)).eval().requires_grad_(False)
    unet = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH,
                                attention_head_dim=4, norm_num_groups=8).requires_grad_(False)
    return tokenizer, text_encoder, unet


def images(colour: tuple[float, float, float], count: int = 3) -> TrainingSet:
    rng = random.Random(str(colour))
    batch = torch.rand(count, 16, 16, 3) * 0.2
    for image in batch:
        top, left = rng.randrange(8), rng.randrange(8)
        image[top:top + 8, left:left + 8] = torch.tensor(colour)
    return TrainingSet(batch, [None] * count, [f"img{i}" for i in range(count)])


def train(world, scheduler, concept, tokens, colour, old, method):
    tokenizer, text_encoder, unet = world
    denoiser = DiffusersDenoiser(unet, scheduler, tokens_per_layer=TOKENS)
    encoder = DiffusersLayerwiseEncoder(tokenizer, text_encoder, len(denoiser.layers))
    config = TrainingConfig(steps=4, method=method, lora_lr=1e-2, embedding_lr=1e-2, seed=len(old),
                            consolidation=ConsolidationWeights())
    trainer = ConceptTrainer(denoiser, encoder, images(colour), ConceptSpec(concept, tokens, [None, "red"]), old,
                             config)
    steps = []
    before = float(trainer.consolidator.loss(trainer.lora, 0).detach())
    task = trainer.run(TrainingCallbacks(on_step=lambda step, total, loss: steps.append(step)))
    after = float(trainer.consolidator.loss(trainer.lora, trainer.step).detach())
    penalties = [before, after]
    return task, steps, penalties, denoiser, encoder


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_two_tasks_in_sequence_then_elastic_aggregation(tiny_world, prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    first, steps, _, denoiser, encoder = train(tiny_world, scheduler, "ball", ["<ball1>", "<ball2>"],
                                               (1.0, 0.0, 0.0), [], "cidm")
    assert steps == [1, 2, 3, 4]
    assert len(denoiser.layers) == 4  # down, mid and two up attentions
    assert all(torch.isfinite(torch.tensor(loss)) for loss in first.losses)
    assert any(up.abs().sum() > 0 for _, up in first.lora.values()), "LoRA up factors left zero"
    assert first.features.shape == (2, 4, WIDTH)

    second, _, penalties, _, _ = train(tiny_world, scheduler, "cube", ["<cube1>", "<cube2>"], (0.0, 0.0, 1.0),
                                       [first.lora], "cidm")
    assert penalties[1] > 0, "the consolidation loss sees the first task"

    tasks = [first, second]
    banks = {layer.index: LayerLoRABank([{p: task.lora[(layer.index, p)] for p in PROJECTIONS} for task in tasks],
                                        0.8) for layer in denoiser.layers}
    router = make_router("elastic", [task.features for task in tasks])
    table = {"<ball1>": first.embeddings[0], "<ball2>": first.embeddings[1]}
    context = encoder.encode("a photo of a <ball1> <ball2>", table).reshape(1, -1, WIDTH)
    noisy = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([500])
    with torch.no_grad():
        plain = denoiser.predict(noisy, level, context)
        with denoiser.adapted(banks, router):
            adapted = denoiser.predict(noisy, level, context)
        restored = denoiser.predict(noisy, level, context)
    assert not torch.allclose(plain, adapted)
    assert torch.equal(plain, restored), "the attention processors were not restored"
    weights = router(0, context.reshape(1, 4, TOKENS, WIDTH)[:, 0], None)
    assert weights.shape == (1, 2) and torch.allclose(weights.sum(1), torch.ones(1))


def test_one_batched_encode_gives_each_layer_its_own_token_vectors_and_gradients(tiny_world):
    tokenizer, text_encoder, _ = tiny_world
    layers = 3
    encoder = DiffusersLayerwiseEncoder(tokenizer, text_encoder, layers)
    vectors = torch.randn(layers, WIDTH, generator=torch.Generator().manual_seed(1), requires_grad=True)
    encoded = encoder.encode("a <cat1> on a mat", {"<cat1>": vectors})
    assert encoded.shape == (layers, TOKENS, WIDTH)
    for layer in range(layers):  # row l is what a one-layer encode with layer l's vector gives
        alone = DiffusersLayerwiseEncoder(tokenizer, text_encoder, 1).encode("a <cat1> on a mat",
                                                                             {"<cat1>": vectors[layer:layer + 1]})
        assert torch.allclose(encoded[layer], alone[0], atol=1e-6)
    assert not torch.allclose(encoded[0], encoded[1])
    encoded[1].sum().backward()
    assert vectors.grad[1].abs().sum() > 0 and vectors.grad[0].abs().sum() == 0 == vectors.grad[2].abs().sum()
    plain = encoder.encode("a cat on a mat", {"<cat1>": vectors})
    assert plain.shape == (layers, TOKENS, WIDTH) and torch.equal(plain[0], plain[2])


def test_shared_token_slots_give_layers_of_one_slot_the_same_encoding_and_pool_their_gradients(tiny_world):
    """Layers 0 and 2 share slot 0 and layer 1 has slot 1: one text-encoder row per slot, the layers of a slot read
    the same encoding, equal to a per-layer encode with the slot's vector copied to its layers; the gradient of a
    slot sums over its layers."""
    tokenizer, text_encoder, _ = tiny_world
    shared = DiffusersLayerwiseEncoder(tokenizer, text_encoder, 3, [0, 1, 0])
    assert shared.num_slots == 2
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(2), requires_grad=True)
    encoded = shared.encode("a <cat1> on a mat", {"<cat1>": vectors})
    per_layer = DiffusersLayerwiseEncoder(tokenizer, text_encoder, 3).encode(
        "a <cat1> on a mat", {"<cat1>": vectors.detach()[[0, 1, 0]]})
    assert encoded.shape == (3, TOKENS, WIDTH) and torch.allclose(encoded, per_layer, atol=1e-6)
    assert torch.equal(encoded[0], encoded[2]) and not torch.allclose(encoded[0], encoded[1])
    (encoded[0].sum() + encoded[2].sum()).backward()
    assert vectors.grad[0].abs().sum() > 0 and vectors.grad[1].abs().sum() == 0
    with pytest.raises(CIDMInputError, match="token_slots: token slots \\[1, 0, 0\\] are not numbered"):
        DiffusersLayerwiseEncoder(tokenizer, text_encoder, 3, [1, 0, 0])


def test_zero_embedding_rate_freezes_tokens_and_caches_contexts(tiny_world):
    tokenizer, text_encoder, unet = tiny_world
    denoiser = DiffusersDenoiser(unet, DDPMScheduler(num_train_timesteps=1000), tokens_per_layer=TOKENS)
    encoder = DiffusersLayerwiseEncoder(tokenizer, text_encoder, len(denoiser.layers))
    trainer = ConceptTrainer(denoiser, encoder, images((0.0, 1.0, 0.0)), ConceptSpec("leaf", ["<leaf1>"], [None]),
                             [], TrainingConfig(steps=2, embedding_lr=0.0, lora_lr=1e-2))
    start = trainer.embeddings.detach().clone()
    task = trainer.run(TrainingCallbacks())
    assert task.embeddings_frozen_at == 0 and torch.equal(task.embeddings, start)
    assert trainer.context_cache and not any(c.requires_grad for c, _ in trainer.context_cache.values())


def test_cond_uncond_layout_reaches_the_router_and_the_other_processors_quietly(tiny_world):
    _, _, unet = tiny_world
    originals = {name: type(processor) for name, processor in unet.attn_processors.items()}
    denoiser = DiffusersDenoiser(unet, DDPMScheduler(num_train_timesteps=1000), tokens_per_layer=TOKENS)
    seen = []

    def router(layer_index, context, cond_or_uncond):
        seen.append(cond_or_uncond)
        return torch.ones(context.shape[0], 1)

    lora = {(layer.index, p): shapes for layer in denoiser.layers
            for p, shapes in ((p, (torch.zeros(1, i), torch.zeros(o, 1)))
                              for p, (o, i) in layer.projection_shapes().items())}
    banks = {layer.index: LayerLoRABank([{p: lora[(layer.index, p)] for p in PROJECTIONS}], 1.0)
             for layer in denoiser.layers}
    warnings = []
    # diffusers warns, once per attention call, about keyword arguments a processor does not name
    with torch.no_grad(), denoiser.adapted(banks, router), \
            mock.patch.object(attention_processor.logger, "warning", side_effect=warnings.append):
        denoiser.predict(torch.zeros(2, 3, 16, 16), torch.tensor([10, 10]), torch.zeros(2, 4 * TOKENS, WIDTH),
                         cond_or_uncond=[0, 1])
    assert seen and all(layout == [0, 1] for layout in seen)
    assert not warnings
    assert {name: type(processor) for name, processor in unet.attn_processors.items()} == originals


def test_a_diverging_training_stops_with_an_error_naming_the_learning_rate(tiny_world):
    """The first non-finite loss stops training before the optimizer step, so no factor turns NaN."""
    tokenizer, text_encoder, unet = tiny_world
    denoiser = DiffusersDenoiser(unet, DDPMScheduler(num_train_timesteps=1000), tokens_per_layer=TOKENS)
    trainer = ConceptTrainer(denoiser, DiffusersLayerwiseEncoder(tokenizer, text_encoder, len(denoiser.layers)),
                             images((1.0, 1.0, 0.0)), ConceptSpec("sun", ["<sun1>"], [None]), [],
                             TrainingConfig(steps=4, lora_lr=1e-2))
    healthy = denoiser.target
    calls = []

    def diverging(*args):
        calls.append(1)
        target = healthy(*args)
        return target * float("nan") if len(calls) == 3 else target

    with mock.patch.object(denoiser, "target", diverging), pytest.raises(CIDMInputError, match="lora_lr") as error:
        trainer.run(TrainingCallbacks())
    assert "diverged at step 3" in str(error.value)
    assert trainer.step == 2 and all(bool(torch.isfinite(t).all()) for pair in trainer.lora.values() for t in pair)

    # A finite loss whose gradient is not finite stops too, before the optimizer turns the factors into NaN.
    up = next(iter(trainer.lora.values()))[1]
    up.register_hook(lambda gradient: gradient * float("inf"))
    with pytest.raises(CIDMInputError, match="diverged at step 3: a gradient is not finite"):
        trainer.run(TrainingCallbacks())
    assert trainer.step == 2 and all(bool(torch.isfinite(t).all()) for pair in trainer.lora.values() for t in pair)


def random_banks(denoiser, tasks: int, seed: int) -> dict[int, LayerLoRABank]:
    generator = torch.Generator().manual_seed(seed)
    return {layer.index: LayerLoRABank([{p: (torch.randn(2, i, generator=generator) * 0.3,
                                             torch.randn(o, 2, generator=generator) * 0.3)
                                         for p, (o, i) in layer.projection_shapes().items()} for _ in range(tasks)],
                                       1.0) for layer in denoiser.layers}


def test_region_attention_processor_gives_each_region_its_prompt_and_concepts(tiny_world):
    """A region over the whole canvas replaces the row's prompt and routing in every layer; a mirror row keeps its
    own context under the region's concepts; a region covering nothing changes nothing. On a 16×32 latent (the
    attention grids 16×32 and 8×16 are derived from the token counts)."""
    _, _, unet = tiny_world
    denoiser = DiffusersDenoiser(unet, DDPMScheduler(num_train_timesteps=1000), tokens_per_layer=TOKENS)
    banks = random_banks(denoiser, tasks=2, seed=3)
    layers = len(denoiser.layers)
    generator = torch.Generator().manual_seed(4)
    noisy = torch.randn(2, 3, 16, 32, generator=generator)
    level = torch.tensor([500, 500])
    own, region = (torch.randn(2, layers * TOKENS, WIDTH, generator=generator) for _ in range(2))
    own_weights = torch.tensor([1.0, 0.0]).expand(2, layers, 2)
    region_weights = torch.tensor([0.0, 1.0]).expand(2, layers, 2)

    def predict(context, weights, regions=None):
        with torch.no_grad(), denoiser.adapted(banks, RowRouter(weights), regions):
            return denoiser.predict(noisy, level, context)

    everywhere, nowhere = torch.ones(8, 16), torch.zeros(8, 16)
    whole = RegionBatch([everywhere], [region], [region_weights], [False, True], (16, 32))
    out = predict(own, own_weights, whole)
    expected_cond = predict(region, region_weights)[0]
    expected_mirror = predict(own, region_weights)[1]
    assert torch.allclose(out[0], expected_cond, atol=1e-5), "a cond row attends to its region's prompt"
    assert torch.allclose(out[1], expected_mirror, atol=1e-5), "a mirror row keeps its context, takes the concepts"
    assert not torch.allclose(out[0], predict(own, own_weights)[0], atol=1e-3)
    empty = predict(own, own_weights, RegionBatch([nowhere], [region], [region_weights], [False, False], (16, 32)))
    assert torch.allclose(empty, predict(own, own_weights), atol=1e-5)
    with pytest.raises(CIDMInputError, match="latent"):
        RegionBatch([everywhere], [region], [region_weights], [False, False], (16, 32)).grid(100)


@pytest.mark.parametrize("damage", ["missing tensor", "wrong shape", "wrong dtype", "step past the end"])
def test_unusable_resume_state_says_to_untick_resume(tiny_world, damage):
    tokenizer, text_encoder, unet = tiny_world
    denoiser = DiffusersDenoiser(unet, DDPMScheduler(num_train_timesteps=1000), tokens_per_layer=TOKENS)
    encoder = DiffusersLayerwiseEncoder(tokenizer, text_encoder, len(denoiser.layers))

    def trainer():
        return ConceptTrainer(denoiser, encoder, images((0.0, 0.0, 1.0)), ConceptSpec("sky", ["<sky1>"], [None]),
                              [], TrainingConfig(steps=2, lora_lr=1e-2))

    saved = []
    first = trainer()
    first.config.save_every = 1
    first.run(TrainingCallbacks(save_state=lambda tensors, meta: saved.append((tensors, meta))))
    tensors, meta = saved[0]
    trainer().restore(dict(tensors), dict(meta))  # the undamaged state restores
    if damage == "missing tensor":
        del tensors["embeddings"]
    elif damage == "wrong shape":
        tensors["embeddings"] = tensors["embeddings"][:, :1]
    elif damage == "wrong dtype":
        tensors["embeddings"] = tensors["embeddings"].to(torch.int8)
    else:
        meta["step"] = 7
    with pytest.raises(CIDMInputError, match="untick resume") as error:
        trainer().restore(tensors, meta)
    assert error.value.input_name == "resume"

# The training loop's pooled conditioning (cidm.train.PooledConditioning, for families with an ADM input such as
# SDXL): a denoiser with pooled_width > 0 gets, per sample, the pooled output of its prompt and its image's original
# size and crop; the pooled output carries gradient to the concept embeddings.


class PooledEncoder(DiffusersLayerwiseEncoder):
    def encode_pooled(self, text, embeddings):
        encoded = self.encode(text, embeddings)
        return encoded, encoded[0, -1:]  # layer 0's last token stands for a pooled output [1, D]


class PooledDenoiser(DiffusersDenoiser):
    """Sees the context only without gradient, so the embeddings learn through the pooled output alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pooled_width = WIDTH
        self.seen: list[PooledConditioning] = []

    def predict(self, noisy, level, context, cond_or_uncond=None, *, extra=None):
        self.seen.append(extra)
        plain = super().predict(noisy, level, context.detach())
        return plain + extra.pooled.sum(-1)[:, None, None, None]


def test_each_sample_gets_its_pooled_output_and_image_size(tiny_world):
    tokenizer, text_encoder, unet = tiny_world
    denoiser = PooledDenoiser(unet, DDPMScheduler(), tokens_per_layer=TOKENS)
    encoder = PooledEncoder(tokenizer, text_encoder, len(denoiser.layers))
    plain = images((1.0, 0.0, 0.0))
    sizes = [ImageSize((100 + i, 50), (i, 0)) for i in range(len(plain.images))]
    training_set = TrainingSet(plain.images, plain.captions, plain.sources, sizes)
    config = TrainingConfig(steps=1, lora_lr=1e-2, embedding_lr=1e-2, batch_size=2)
    trainer = ConceptTrainer(denoiser, encoder, training_set, ConceptSpec("ball", ["<ball1>"], [None]), [], config)
    start = trainer.embeddings.detach().clone()
    trainer.run(TrainingCallbacks())
    (extra,) = denoiser.seen
    assert extra.pooled.shape == (2, WIDTH) and all(size in sizes for size in extra.sizes)
    assert trainer.embeddings.grad is not None and trainer.embeddings.grad.abs().sum() > 0
    assert not torch.equal(trainer.embeddings.detach(), start)
    contexts, preview = trainer.preview_contexts()
    assert contexts.shape[0] == 2 and preview.pooled.shape == (2, WIDTH) and preview.sizes == [None, None]
    assert not preview.pooled.requires_grad


def test_a_denoiser_without_pooled_input_gets_none(tiny_world):
    tokenizer, text_encoder, unet = tiny_world
    denoiser = DiffusersDenoiser(unet, DDPMScheduler(), tokens_per_layer=TOKENS)
    encoder = DiffusersLayerwiseEncoder(tokenizer, text_encoder, len(denoiser.layers))
    trainer = ConceptTrainer(denoiser, encoder, images((0.0, 1.0, 0.0)), ConceptSpec("cube", ["<cube1>"], [None]),
                             [], TrainingConfig(steps=1))
    assert trainer.preview_contexts()[1] is None
