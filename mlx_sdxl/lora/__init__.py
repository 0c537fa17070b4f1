"""LoRA and LyCORIS adapters for the SDXL UNets and text encoders.

    formats   files as users download them (kohya/A1111, diffusers/PEFT, older diffusers,
              LyCORIS LoHa/LoKr) -> one LayerWeights per adapted layer
    keys      which model layer each file layer means (SGM names through single_file's rules)
    deltas    the weight change of each layer, by the published formulas
    apply     fused into dense weights, or a side path beside quantized layers
    registry  opening a LoRA for a pipeline model (all checks first) and the set a pipeline holds
    files     sources (file, folder, hub id) and A1111's short hash
    tags      `<lora:NAME:SCALE>` prompt tags
"""

from .apply import Active, SidePath, apply_adapters
from .files import lora_path, short_hash, split_scale
from .formats import LayerWeights, LoraFile, read_lora_file
from .keys import RoleLayers, Target, match_layers
from .registry import LoadedLora, LoraRegistry, LoraWarning, check_scale, open_lora
from .tags import LoraTag, find_lora, parse_lora_tags, strip_lora_tags

__all__ = ["Active", "LayerWeights", "LoadedLora", "LoraFile", "LoraRegistry", "LoraTag", "LoraWarning",
           "RoleLayers", "SidePath", "Target", "apply_adapters", "check_scale", "find_lora", "lora_path",
           "match_layers", "open_lora", "parse_lora_tags", "read_lora_file", "short_hash", "split_scale",
           "strip_lora_tags"]
