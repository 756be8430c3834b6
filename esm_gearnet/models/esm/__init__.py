"""ESM protein language models: the `ESM` encoder and its parts (see `encoder`). Everything the rest of the
framework and its users import is here."""
from .architecture import ARCHITECTURES, DEFAULT_MODEL, WeightError, build_esm2, load_esm_checkpoint
from .attention import esm2_forward_sdpa, esm2_forward_varlen, uses_varlen_kernel, varlen_attention
from .encoder import ESM
from .lora import TARGETS as LORA_TARGETS, LoRASettings, merge_lora
from .tokens import MAX_RESIDUES, Tokenizer
from .vocabularies import SAPROT_TOKENS, VOCABULARIES
from .weights import weight_source

__all__ = ["ARCHITECTURES", "DEFAULT_MODEL", "ESM", "LORA_TARGETS", "LoRASettings", "MAX_RESIDUES", "SAPROT_TOKENS",
           "Tokenizer", "VOCABULARIES", "WeightError", "build_esm2", "esm2_forward_sdpa", "esm2_forward_varlen",
           "load_esm_checkpoint", "merge_lora", "uses_varlen_kernel", "varlen_attention", "weight_source"]
