"""Evaluation: the original Qwen-VL benchmark protocol's metrics (`qwenvl.eval.metrics`), pure functions of text."""
