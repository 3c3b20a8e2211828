"""Instruction finetuning: data (``data``), prompt formats (``prompts``, the single source of them),
LoRA finetuning engines behind one interface (``engines``: ``groundup_engine`` for our GPT, ``litgpt_engine``
for any LitGPT model in a subprocess), test-set responses and the judge."""
