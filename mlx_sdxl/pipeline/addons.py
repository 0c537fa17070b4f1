"""What a pipeline loads on top of its models, and keeps until told otherwise: LoRAs,
textual-inversion embeddings and ControlNets."""

from __future__ import annotations

from typing import Optional

from ..embeddings import Embedding, read_embedding
from ..spec import BASE


class AddOns:
    """LoRA, embedding and ControlNet methods of SDXLPipeline (which provides `base`,
    `refiner`, `models`, `embeddings`, `controlnets`, `_source` and `_lock`)."""

    def load_controlnet(self, source, name: Optional[str] = None) -> str:
        """Load an SDXL ControlNet (a diffusers folder, a .safetensors file in diffusers naming, or
        a hub id) under `name` (default: its folder or file name) and return the name; use it
        with `control=[mlx_sdxl.Control(name, image, scale, start, end)]`. Quantized as it loads
        with `controlnet_bits`."""
        return self.controlnets.load(source, name, self.base.configs["unet"])

    def unload_controlnet(self, name: Optional[str] = None) -> None:
        """Drop one ControlNet, or all of them (None)."""
        self.controlnets.unload(name)

    def load_embedding(self, path, token: Optional[str] = None) -> Embedding:
        """Load an SDXL textual-inversion embedding (.safetensors with `clip_l` and `clip_g`)
        under `token` (default: the file's stem); the token then works in any prompt, in
        both prompt syntaxes. Checked against the text encoders' widths and the vocabulary
        (from the configs and tokenizer; no model loads)."""
        emb = read_embedding(path, token)
        widths = {"clip_l": self.base.configs["text_encoder"]["hidden_size"],
                  "clip_g": self.base.configs["text_encoder_2"]["hidden_size"]}
        with self._lock:
            return self.embeddings.add(emb, widths, self.base.tokenizer("tokenizer"))

    # ------------------------------------------------------------------ LoRAs (mlx_sdxl.lora)
    def load_lora(self, source, scale: float = 1.0, *, name: Optional[str] = None, target: str = BASE) -> str:
        """Load a LoRA (kohya/A1111, diffusers/PEFT, LyCORIS LoHa/LoKr) onto the base or refiner:
        its UNet and, where the file has text-encoder parts, the matching text encoders.
        `source`: a .safetensors file, a folder holding one, or a hub id. Returns its name
        (default: the file's stem). Dense weights get it fused; quantized layers run it beside."""
        from ..lora import open_lora

        model = self._source(target)
        lora = open_lora(source, model, name=name, scale=scale, others=[self.base, self.refiner])
        with self._lock:
            self.models.add_lora(lora, model)
        return lora.name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (negative ones too; 0 turns it off)."""
        from ..lora import check_scale

        with self._lock:
            self.models.set_lora_scale(name, check_scale(scale), self._source(self.models.loras.get(name).role))

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Take a LoRA off (None: all of them); the weights it changed are read again from the model's files."""
        with self._lock:
            self.models.remove_lora(name, (self.base, self.refiner))

    @property
    def loras(self) -> dict:
        """{name: scale} of the loaded LoRAs, in load order."""
        return self.models.loras.scales()
