"""Training: data (records -> tokens and trained-token masks), LoRA adapters, the one training loop with its
checkpoints (shared by fine-tuning and pretraining), and `finetune`, which wires them together."""
