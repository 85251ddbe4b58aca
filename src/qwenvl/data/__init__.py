"""Training and evaluation data made by the project: `synth` draws pictures of shapes and words with exact
ground truth and writes conversations in the fine-tuning format (SPEC section 9)."""
