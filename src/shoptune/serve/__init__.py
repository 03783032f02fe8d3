"""Online multi-task serving: one base model, many LoRA adapters, an OpenAI-compatible API."""
