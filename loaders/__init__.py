"""Files -> modules: format and layout detection, key maps, safetensors/GGUF readers."""
