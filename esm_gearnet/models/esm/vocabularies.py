"""The vocabularies ESM models read here, each a fair-esm `Alphabet`: ESM-2's 33 tokens, SaProt's 446
structure-aware ones and ESM C's 33. The one place that knows them (name -> Alphabet factory); a Hugging Face
folder's vocabulary is recognised among them (`hugging_face.hf_alphabet`)."""
from __future__ import annotations


def _esm2_alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")  # ESM-2 uses ESM-1b's 33 tokens


# SaProt's structure-aware vocabulary (westlake-repl/SaProt, utils/esm_loader.py and the vocab.txt of its Hugging
# Face checkpoints such as SaProt_650M_AF2): five special tokens, then every amino acid (upper case, `#` for a
# masked amino acid) paired with every 3Di letter (lower case, `#` for masked or low-confidence structure), in
# the order of SaProt's two strings below (amino acid major): 5 + 21 x 21 = 446 tokens.
SAPROT_SPECIAL_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>")
SAPROT_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY#"
SAPROT_THREE_DI = "pynwrqhgdlvtmfsaeikc#"
SAPROT_TOKENS = tuple(SAPROT_SPECIAL_TOKENS) + tuple(a + s for a in SAPROT_AMINO_ACIDS for s in SAPROT_THREE_DI)


def _saprot_alphabet():
    """fair-esm Alphabet of SaProt's 446 tokens (`<cls>` prepended, `<eos>` appended), as SaProt builds it."""
    import esm

    alphabet = esm.data.Alphabet(standard_toks=list(SAPROT_TOKENS), prepend_toks=[], append_toks=[],
                                 prepend_bos=True, append_eos=True, use_msa=False)
    alphabet.all_toks = alphabet.all_toks[:len(SAPROT_TOKENS)]  # without the <null_i> padding to a multiple of 8
    alphabet.tok_to_idx = {token: i for i, token in enumerate(alphabet.all_toks)}
    alphabet.unique_no_split_tokens = alphabet.all_toks
    return alphabet


# ESM C's vocabulary (EvolutionaryScale's `esm.utils.constants.esm3.SEQUENCE_VOCAB`, transformers' EsmcTokenizer):
# ESM-2's 33 tokens in ESM-2's order, except id 31: the chain break `|` where ESM-2 has `<null_1>` (never written
# here: each protein is embedded on its own). The model's embedding has 64 rows; ids 33..63 are unused.
ESMC_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-|", "<mask>")


def _esmc_alphabet():
    """fair-esm Alphabet of ESM C's 33 tokens (`<cls>` prepended, `<eos>` appended). A residue of unknown type reads
    as `X`, as EvolutionaryScale's `esm` package writes a non-standard residue of a structure (ESM-2 reads
    `<unk>`)."""
    import esm

    alphabet = esm.data.Alphabet(standard_toks=list(ESMC_TOKENS), prepend_toks=[], append_toks=[],
                                 prepend_bos=True, append_eos=True, use_msa=False)
    alphabet.all_toks = list(ESMC_TOKENS)
    alphabet.tok_to_idx = {token: i for i, token in enumerate(alphabet.all_toks)}
    alphabet.unique_no_split_tokens = alphabet.all_toks
    alphabet.unknown_residue = "X"
    return alphabet


def is_saprot(alphabet) -> bool:
    """Whether a fair-esm Alphabet is SaProt's structure-aware vocabulary."""
    return list(alphabet.all_toks) == list(SAPROT_TOKENS)


VOCABULARIES = {"ESM-2": _esm2_alphabet, "SaProt": _saprot_alphabet, "ESM C": _esmc_alphabet}
