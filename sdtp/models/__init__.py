"""Model loading (embedded GGUF model, hub models, tiny test models) and architecture access."""

from sdtp.models.loading import (
    SUPPORTED_FAMILIES,
    check_supported,
    decoder_layers,
    load_model,
    resolve_dtype,
)

__all__ = ["SUPPORTED_FAMILIES", "check_supported", "decoder_layers", "load_model", "resolve_dtype"]
