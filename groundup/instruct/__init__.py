"""Instruction finetuning: data (``data``), prompt formats (``prompts``, the single source of them),
LoRA finetuning of our GPT (``lora_finetune``) or of any LitGPT model in a subprocess (``litgpt_finetune``),
test-set responses and the judge."""
