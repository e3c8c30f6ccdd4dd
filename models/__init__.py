"""Loading models by name, the self-attention swap and LoRA wrapping."""
