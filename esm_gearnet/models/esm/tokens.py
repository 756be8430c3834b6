"""From a batch's residues to ESM tokens: one token per residue (SaProt-format models: per residue and its 3Di
state), each protein cut into windows of at most `context - 2` residues (`MAX_RESIDUES` = 1022 for ESM-2's 1024
positions, 2046 for ESM C's 2048), each window its own `<cls>` ... `<eos>` sequence, laid out padded ([W, T],
`esm2_forward_sdpa` and fair-esm's forward) or packed ([T], `varlen`).

DEVIATION: proteins longer than 1022 residues were truncated by the original, which then failed in serial fusion
(fewer ESM features than residues). Here they are cut into consecutive windows of at most 1022 residues, each run
with its own `<cls>`/`<eos>`, so every residue gets a feature (a warning says so).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from ...data import constants
from ...data.protein import ProteinBatch
from ...layers import functional
from .vocabularies import is_saprot

CONTEXT = 1024  # ESM-2 was trained on 1024 positions, cls and eos included
MAX_RESIDUES = CONTEXT - 2


def residue_tokens(alphabet) -> torch.Tensor:
    """The token of each residue type in the framework's order (G A S P V T C I L N D Q K E M H F R Y W), then
    unknown -> `<unk>` (ESM C: `X`, the alphabet's `unknown_residue`).

    Returns:
        [21] long token ids.
    """
    unknown = getattr(alphabet, "unknown_residue", None)
    tokens = [alphabet.get_idx(c) for c in constants.RESIDUE_LETTERS] + \
        [alphabet.unk_idx if unknown is None else alphabet.get_idx(unknown)]
    return torch.tensor(tokens, dtype=torch.long)


def saprot_tokens(alphabet) -> torch.Tensor:
    """SaProt's token of (residue row, structure column): rows the residue types, unknown (`<unk>`) and a masked
    amino acid (`#`); columns the 3Di states 0..19 and masked structure (`#`).

    Returns:
        [22, 21] long token ids.
    """
    from ...data.foldseek import THREE_DI_LETTERS

    structure = [c.lower() for c in THREE_DI_LETTERS] + ["#"]
    rows = [[alphabet.get_idx(a + s) for s in structure] for a in constants.RESIDUE_LETTERS + "#"]
    rows.insert(constants.NUM_RESIDUE_TYPES, [alphabet.unk_idx] * len(structure))
    return torch.tensor(rows, dtype=torch.long)


class Tokenizer(nn.Module):
    """The tokens of one alphabet for packed residues (its tables are buffers, so they follow the model's device).

    Args:
        alphabet: a fair-esm Alphabet (`vocabularies`).
        plddt_mask, plddt_threshold: SaProt-format alphabets only: `#` for the structure of residues whose pLDDT
            (`Protein.bfactor`) is below the threshold (see `ESM`).
        context: tokens of a window, `<cls>` and `<eos>` included (the model's training length).
    """

    def __init__(self, alphabet, plddt_mask: bool = False, plddt_threshold: float = 70.0, context: int = CONTEXT):
        super().__init__()
        self.alphabet = alphabet
        self.max_residues = int(context) - int(alphabet.prepend_bos) - int(alphabet.append_eos)
        if self.max_residues < 1:
            raise ValueError(f"ESM: a context of {context} tokens leaves no room for a residue.")
        self.saprot = is_saprot(alphabet)
        self.plddt_mask = bool(plddt_mask)
        self.plddt_threshold = float(plddt_threshold)
        self.register_buffer("mapping", residue_tokens(alphabet), persistent=False)
        if self.saprot:
            self.register_buffer("saprot_mapping", saprot_tokens(alphabet), persistent=False)

    def structure(self, batch: ProteinBatch) -> Optional[torch.Tensor]:
        """The structure column of each residue's SaProt token (see `ESM` for the rules).

        Args:
            batch: residue_type [N], three_di_state [N] when kept (else computed from atom_pos [N, 14, 3]), and
                bfactor [N] with `plddt_mask`.
        Returns:
            [N] long: 3Di state 0..19, 20 for `#`; None for an alphabet without structure.
        """
        if not self.saprot:
            return None
        from ...data import foldseek

        states = batch.three_di_state
        if states is None:  # not kept by the dataset: from the backbone, each chain of each protein on its own
            states = foldseek.batch_states(batch)
        states = states.to(batch.residue_type.device).long()
        # a residue without a state reads as Foldseek's placeholder D, as in SaProt's training data
        states = states.masked_fill(states.eq(foldseek.NO_STATE),
                                    foldseek.THREE_DI_LETTERS.index(foldseek.FOLDSEEK_PLACEHOLDER))
        if self.plddt_mask:
            states = states.masked_fill(batch.bfactor.to(states.device) < self.plddt_threshold, foldseek.NUM_STATES)
        return states

    def ids(self, residue_type: torch.Tensor, residue_mask: Optional[torch.Tensor] = None,
            structure: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token id of each packed residue.

        Args:
            residue_type: [N] residue types.
            residue_mask: [N] bool, residues that get the mask token (SaProt: `#` for the amino acid, the 3Di
                letter kept).
            structure: [N] the structure column (`structure`); needed by SaProt-format alphabets.
        Returns:
            [N] long token ids.
        """
        if self.saprot:
            if structure is None:
                raise ValueError("ESM: a SaProt-format model needs each residue's 3Di state (`structure_tokens`).")
            rows = residue_type.long()
            if residue_mask is not None:  # SaProt masks the amino acid and keeps the structure: `#d`
                rows = rows.masked_fill(residue_mask, constants.NUM_RESIDUE_TYPES + 1)
            return self.saprot_mapping[rows, structure.long()]
        ids = self.mapping[residue_type]
        if residue_mask is not None:
            ids = ids.masked_fill(residue_mask, self.alphabet.mask_idx)
        return ids

    def strings(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> List[str]:
        """Each protein's tokens as one string (SaProt: `MdEvVp...`; ESM-2: its residue letters; special tokens as
        written, e.g. `<unk>`), without `<cls>` / `<eos>`.

        Args:
            batch: residue_type [N], num_residues [B] (and what `structure` reads).
            residue_mask: [N] bool, as in `ids`.
        """
        ids = self.ids(batch.residue_type, residue_mask, self.structure(batch))
        return ["".join(self.alphabet.all_toks[i] for i in chunk.tolist())
                for chunk in ids.split(batch.num_residues.tolist())]

    def _windows(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
                 residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None):
        """Token ids [N] of the packed residues, their window [N] and column within it [N] (`<cls>` is column
        0), and the residues of each window [W]."""
        ids = self.ids(residue_type, residue_mask, structure)
        position = functional.position_in_segment(num_residues)
        size = self.max_residues
        windows_per_protein = (num_residues + size - 1) // size
        if bool((num_residues > size).any()):
            warnings.warn(f"ESM: proteins longer than {size} residues are embedded in windows of {size} residues.",
                          stacklevel=5)
        residue2graph = functional.segment_ids(num_residues)
        window = functional.offsets(windows_per_protein)[residue2graph] + position // size
        column = position % size + int(self.alphabet.prepend_bos)
        window_length = torch.bincount(window, minlength=int(windows_per_protein.sum()))
        return ids, window, column, window_length

    def padded(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
               residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded tokens, one row per window.

        Args:
            residue_type: [N] residue types.
            num_residues: [B] residues of each protein.
            residue_mask: [N] bool, as in `ids`.
            structure: [N] SaProt's structure column, as in `ids`.
        Returns:
            tokens [W, T], and the (window row, column) of every packed residue ([N], [N]).
        """
        alphabet = self.alphabet
        ids, window, column, window_length = self._windows(residue_type, num_residues, residue_mask, structure)
        num_windows = len(window_length)
        length = int(window_length.max()) + int(alphabet.prepend_bos) + int(alphabet.append_eos) if num_windows else 0
        tokens = ids.new_full((num_windows, length), alphabet.padding_idx)
        tokens[window, column] = ids
        rows = torch.arange(num_windows, device=ids.device)
        if alphabet.prepend_bos:
            tokens[:, 0] = alphabet.cls_idx
        if alphabet.append_eos:
            tokens[rows, window_length + int(alphabet.prepend_bos)] = alphabet.eos_idx
        return tokens, window, column

    def packed(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
               residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpadded tokens: every window its own `<cls>` ... `<eos>` sequence, all sequences one after the other.

        Args:
            residue_type: [N] residue types.
            num_residues: [B] residues of each protein.
            residue_mask: [N] bool, as in `ids`.
            structure: [N] SaProt's structure column, as in `ids`.
        Returns:
            tokens [T], cu_seqlens [W + 1] (sequence w holds tokens cu_seqlens[w] .. cu_seqlens[w + 1] - 1) and
            the token of every packed residue [N].
        """
        alphabet = self.alphabet
        ids, window, column, window_length = self._windows(residue_type, num_residues, residue_mask, structure)
        bos, eos = int(alphabet.prepend_bos), int(alphabet.append_eos)
        sequence_length = window_length + bos + eos  # [W]
        cu_seqlens = torch.zeros(len(window_length) + 1, dtype=torch.long, device=ids.device)
        cu_seqlens[1:] = torch.cumsum(sequence_length, 0)
        start = cu_seqlens[:-1]
        tokens = ids.new_full((int(cu_seqlens[-1]),), alphabet.padding_idx)  # every entry is overwritten below
        token = start[window] + column
        tokens[token] = ids
        if bos:
            tokens[start] = alphabet.cls_idx
        if eos:
            tokens[start + window_length + bos] = alphabet.eos_idx
        return tokens, cu_seqlens, token
