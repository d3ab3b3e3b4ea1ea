"""PyTorch sources copied into every exported model directory (need torch + transformers only)."""
