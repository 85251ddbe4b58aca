"""Fine-tuning: data pipeline, what trains (freeze plans, LoRA), the loop and its outputs."""
