"""The vision-language model: vision encoder -> token compression -> projector -> causal LM.

``VLM(vision_encoder, compressor, projector, language_model, image_token_id)``. Each image becomes
``K`` embeddings that replace its run of ``K`` placeholder tokens in ``input_ids`` (placeholder
order = image order). The language model is any Hugging Face causal LM that accepts
``inputs_embeds``; the hybrid ``NemotronHForCausalLM`` is first-class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ImagesArg = torch.Tensor | Sequence[torch.Tensor] | None


def split_images(images: ImagesArg) -> list[torch.Tensor]:
    """Normalise the ``images`` argument to a list of ``(n_i, 3, H_i, W_i)`` batches of equal size each.

    Accepts ``(N, 3, H, W)``, or a list of ``(3, H, W)`` / ``(n, 3, H, W)`` tensors of different sizes.
    Consecutive images of one size are batched together; order is preserved.
    """
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        return [images] if images.shape[0] else []
    groups: list[list[torch.Tensor]] = []
    for i, image in enumerate(images):
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"images[{i}] must be (3, H, W) or (n, 3, H, W), got {tuple(image.shape)}")
        if groups and groups[-1][0].shape[-2:] == image.shape[-2:]:
            groups[-1].append(image)
        else:
            groups.append([image])
    return [torch.cat(g) for g in groups]


def placeholder_runs(input_ids: torch.Tensor, token_id: int) -> list[tuple[int, int, int]]:
    """Runs of consecutive placeholder tokens as ``(row, start, length)``, row-major order."""
    is_ph = input_ids == token_id
    prev = torch.zeros_like(is_ph)
    prev[:, 1:] = is_ph[:, :-1]
    starts = (is_ph & ~prev).nonzero().tolist()
    runs = []
    for row, start in starts:
        length = 0
        while start + length < input_ids.shape[1] and bool(is_ph[row, start + length]):
            length += 1
        runs.append((row, start, length))
    return runs


class VLM(nn.Module):
    """Vision-language model.

    Args:
        vision_encoder: module with ``patch_size`` whose ``forward(images (N, 3, H, W) in [0, 1])`` returns an
            object with ``.features`` ``(N, h*w, D)`` (an mmfm ``RadioOutput``).
        compressor: module mapping ``(N, h*w, D)`` and the grid ``(h, w)`` to ``(N, K, D')``.
        projector: module mapping ``(N, K, D')`` to ``(N, K, D_lm)``.
        language_model: HF causal LM accepting ``inputs_embeds``.
        image_token_id: id of the placeholder token; each image needs a run of ``K`` of them.
    """

    def __init__(self, vision_encoder: nn.Module, compressor: nn.Module, projector: nn.Module,
                 language_model: nn.Module, image_token_id: int, freeze_vision: bool = True,
                 cpe_augment: bool = False) -> None:
        super().__init__()
        self.cpe_augment = cpe_augment
        self.vision_encoder = vision_encoder
        self.compressor = compressor
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        self.freeze_vision = freeze_vision
        if freeze_vision:
            self.vision_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> VLM:
        """A frozen vision encoder stays in eval mode: its train-time behaviour (CPE position-embedding crops and
        dropout) would feed the language model features it never sees at inference. A trainable encoder trains,
        but its cropped position embeddings (CPE) stay in eval mode unless ``cpe_augment``: RADIO's random
        position crops and whole-sample position dropout are a distillation augmentation; in a VLM they scramble
        where each visual token is at train time only (left/right/top/bottom questions then cannot be learned)."""
        super().train(mode)
        if self.freeze_vision:
            self.vision_encoder.eval()
        elif not self.cpe_augment:
            from mmfm.radio.cpe import CroppedPositionEmbedding

            for m in self.vision_encoder.modules():
                if isinstance(m, CroppedPositionEmbedding):
                    m.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def tokens_per_image(self, height: int, width: int) -> int:
        """Number of placeholder tokens an image of ``height x width`` pixels needs."""
        patch = self.vision_encoder.patch_size
        return int(self.compressor.num_output_tokens(height // patch, width // patch))

    def embed_images(self, images: ImagesArg) -> list[torch.Tensor]:
        """Encode, compress and project images; returns one ``(K_i, D_lm)`` tensor per image, in order."""
        out: list[torch.Tensor] = []
        for batch in split_images(images):
            batch = batch.to(self.device)
            grad = torch.is_grad_enabled() and not self.freeze_vision
            with torch.set_grad_enabled(grad):
                features = self.vision_encoder(batch).features  # (n, h*w, D)
            patch = self.vision_encoder.patch_size
            grid = (batch.shape[-2] // patch, batch.shape[-1] // patch)
            tokens = self.compressor(features, grid)  # (n, K, D')
            tokens = tokens[0] if isinstance(tokens, tuple) else tokens
            out.extend(self.projector(tokens).unbind(0))
        return out

    def build_inputs_embeds(self, input_ids: torch.Tensor, images: ImagesArg) -> torch.Tensor:
        """Token embeddings with each placeholder run replaced by its image's embeddings ``(B, L, D_lm)``."""
        embed = self.language_model.get_input_embeddings()
        image_embeds = self.embed_images(images)
        runs = placeholder_runs(input_ids, self.image_token_id)
        if len(runs) != len(image_embeds):
            raise ValueError(
                f"got {len(image_embeds)} images but {len(runs)} runs of image placeholder tokens "
                f"(id {self.image_token_id}) in input_ids; give one image per <image> placeholder"
            )
        inputs_embeds = embed(input_ids)
        if not runs:
            return inputs_embeds
        for i, ((_row, _start, length), emb) in enumerate(zip(runs, image_embeds)):
            if length != emb.shape[0]:
                raise ValueError(
                    f"image {i} gives {emb.shape[0]} tokens but its placeholder run has {length} tokens; "
                    f"expand each <image> to tokens_per_image(H, W) placeholders"
                )
        # One out-of-place scatter keeps autograd simple: rows/positions of every placeholder, in order.
        index = torch.cat([torch.arange(s, s + n, device=input_ids.device) + r * input_ids.shape[1]
                           for r, s, n in runs])
        flat = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])
        flat = flat.index_copy(0, index, torch.cat(image_embeds).to(flat.dtype))
        return flat.view_as(inputs_embeds)

    def forward(self, input_ids: torch.Tensor, images: ImagesArg = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """Returns the language model's output (``.logits (B, L, V)``, ``.loss`` when labels are given)."""
        inputs_embeds = self.build_inputs_embeds(input_ids, images)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, images: ImagesArg, prompt: str | Sequence[str], max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, tokenizer=None,
                 on_token=None, generator: torch.Generator | None = None) -> list[str]:
        """Answer ``prompt`` (one per image; ``<image>`` is prepended when absent) for ``images``.

        Batched with left padding; greedy by default, or temperature + nucleus sampling. ``on_token``
        receives each new ``(B,)`` token batch (streaming). Returns the decoded answers.
        """
        from mmfm.vlm.conversation import build_prompts
        from mmfm.vlm.generation import generate_from_embeds

        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("generate needs a tokenizer: pass tokenizer=... or load the VLM with mmfm.vlm.load")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        groups = split_images(images)
        sizes = {tuple(g.shape[-2:]) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"generate batches images of one size; got sizes {sorted(sizes)}")
        (h, w), = sizes
        position = getattr(getattr(self, "config", None), "image_position", "first")
        ids, mask = build_prompts(tokenizer, prompts, self.image_token_id, self.tokens_per_image(h, w),
                                  image_position=position)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.build_inputs_embeds(ids, images)
        out = generate_from_embeds(self.language_model, embeds, mask, max_new_tokens,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
                                   on_token=on_token)
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tolist()]

    def answer(self, tokenizer, images: ImagesArg, questions: Sequence[str], max_new_tokens: int = 8) -> list[str]:
        """Greedy short answers for VQA evaluation."""
        return self.generate(images, list(questions), max_new_tokens=max_new_tokens, tokenizer=tokenizer)
