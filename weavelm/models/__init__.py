"""Model families, Hugging Face config parsing, checkpoint loading (safetensors, GGUF)."""
