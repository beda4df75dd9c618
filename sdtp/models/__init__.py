"""Model loading (embedded GGUF model, hub models, tiny test models) and architecture access."""

from sdtp.lazy import lazy_exports

__all__ = ["SUPPORTED_FAMILIES", "check_supported", "decoder_layers", "load_model", "resolve_dtype"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "sdtp.models.loading"))
