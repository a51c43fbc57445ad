"""Inference engines' own memory budgets, pure Python: llama.cpp/Ollama (`llamacpp`) and
vLLM/SGLang (`vllm`). Each engine follows its own source, cited rule by rule (docs/engines.md)."""
