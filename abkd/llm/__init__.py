"""LLM distillation: instruction data, the KD trainer, generation and ROUGE-L evaluation."""
