"""Modality tokenizers: raw inputs of one modality -> tokens in the generalist's shared sequence space.

The generalist (moe_engine.mtl.generalist.model) takes a mapping modality -> tokenizer module;
a task's inputs go through the tokenizer of `task.modality`, and target texts through the "text"
one. A tokenizer is any nn.Module with this small protocol (`ModalityTokenizer`):

    collate(parts) -> inputs
        concatenate the inputs of several tasks along the batch (the sub-batch values of one
        modality); an empty list gives zero rows, on the tokenizer's device. `len(inputs)` is B.
    forward(inputs) -> (tokens_BLD, padding_mask_BL)
        tokens_BLD: (B, L, D) float, positions already added; padding_mask_BL: (B, L) bool, True
        where a token is padding (masked out of attention, not routed), or None when no input
        of this modality is ever padded. B = 0 must work.

To add a modality, write such a module and pass it in the model's `tokenizers` mapping.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

# The text vocabulary, built in code so that no download is ever needed: id 0 is padding,
# id 1 stands for every character outside the list, then one id per character.
PAD_ID, UNK_ID = 0, 1
TEXT_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;'!?-+=/()"


@runtime_checkable
class ModalityTokenizer(Protocol):
    """What the generalist needs from a tokenizer (see the module docstring)."""

    def collate(self, parts: Sequence[Any]) -> Any: ...

    def __call__(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class ImagePatchTokenizer(nn.Module):
    """Images (B, H, W) -> patch tokens (B, P, D): each p x p patch (row-major) through one Linear,
    plus a learned position per patch. Never padded (the mask is None).

    Args:
        image_shape: (H, W); patch_size must divide both.
        patch_size: p.
        d_model: D.
    """

    def __init__(self, image_shape: tuple[int, int], patch_size: int, d_model: int) -> None:
        super().__init__()
        height, width = image_shape
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(f"patch_size = {patch_size}: must be >= 1 and divide the image shape {tuple(image_shape)}")
        self.image_shape = (height, width)
        self.patch_size = patch_size
        self.num_patches = (height // patch_size) * (width // patch_size)
        self.proj = nn.Linear(patch_size * patch_size, d_model)
        self.pos_embed = nn.Parameter(torch.empty(self.num_patches, d_model))
        nn.init.normal_(self.pos_embed, std=0.02)

    def collate(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """(sum of B_i, H, W): the parts' images one after the other; no parts: (0, H, W)."""
        if not parts:
            return self.proj.weight.new_zeros(0, *self.image_shape)
        return torch.cat([part.to(self.proj.weight.device) for part in parts])

    def patchify(self, images_BHW: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, P, p*p), patches in row-major order."""
        B, H, W = images_BHW.shape
        p = self.patch_size
        patches = images_BHW.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)
        return patches.reshape(B, (H // p) * (W // p), p * p)

    def forward(self, images_BHW: torch.Tensor) -> tuple[torch.Tensor, None]:
        """images_BHW: (B, H, W) float, any B >= 0 -> ((B, P, D) in the parameters' dtype, None)."""
        if images_BHW.dim() != 3 or tuple(images_BHW.shape[1:]) != self.image_shape:
            height, width = self.image_shape
            raise ValueError(f"images have shape {tuple(images_BHW.shape)}: expected (B, {height}, {width})")
        patches_BPX = self.patchify(images_BHW.to(self.proj.weight))
        return self.proj(patches_BPX) + self.pos_embed, None


class TextTokenizer(nn.Module):
    """Strings -> character tokens (B, L, D): a learned embedding per character id plus a learned
    position, L = the longest text of the batch after truncation to max_len, shorter texts padded.

    The vocabulary is `TEXT_CHARACTERS` after PAD and UNK (vocab_size ids); texts are lowercased
    first (as CLIP's tokenizer does), and any other character becomes UNK.

    Args:
        d_model: D.
        max_len: texts are cut to their first max_len characters.
    """

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"max_text_len = {max_len}: must be >= 1")
        self.max_len = max_len
        self.char_to_id = {c: i + 2 for i, c in enumerate(TEXT_CHARACTERS)}
        self.vocab_size = len(TEXT_CHARACTERS) + 2
        # padding_idx: the PAD row stays zero and gets no gradient (masked out anyway).
        self.embed = nn.Embedding(self.vocab_size, d_model, padding_idx=PAD_ID)
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        self.pos_embed = nn.Parameter(torch.empty(max_len, d_model))
        nn.init.normal_(self.pos_embed, std=0.02)

    def collate(self, parts: Sequence[Sequence[str]]) -> list[str]:
        """The parts' texts one after the other (a list; no parts: [])."""
        return [text for part in parts for text in part]

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_BL int64, padding_mask_BL bool, True at PAD), on the embedding's device.

        L = min(max_len, longest text); an empty batch gives (0, 0) tensors.
        """
        if isinstance(texts, str):
            raise ValueError(f"texts = {texts!r}: expected a list of strings, not one string")
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"text {text!r} of type {type(text).__name__}: expected str")
        rows = [[self.char_to_id.get(c, UNK_ID) for c in text.lower()[: self.max_len]] for text in texts]
        length = max((len(row) for row in rows), default=0)
        ids_BL = torch.full((len(rows), length), PAD_ID, dtype=torch.int64)
        for i, row in enumerate(rows):
            ids_BL[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        ids_BL = ids_BL.to(self.embed.weight.device)
        return ids_BL, ids_BL == PAD_ID

    def decode(self, ids_BL: torch.Tensor) -> list[str]:
        """The texts of ids (PAD dropped, UNK as '?'); lowercased and truncated as encode left them."""
        id_to_char = {i: c for c, i in self.char_to_id.items()} | {UNK_ID: "?"}
        return ["".join(id_to_char[int(i)] for i in row if int(i) != PAD_ID) for row in ids_BL]

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts: B strings, B >= 0 -> (tokens (B, L, D), padding_mask (B, L) bool)."""
        ids_BL, padding_mask_BL = self.encode(texts)
        return self.embed(ids_BL) + self.pos_embed[: ids_BL.shape[1]], padding_mask_BL
